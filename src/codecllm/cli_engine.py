"""`codecllm generate`, `codecllm chat` and `codecllm bench`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from codecllm.codecs import CODECS
from codecllm.engine import load
from codecllm.errors import CodecllmError, ConfigError


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _kv(value: str) -> str:
    from codecllm.kv.variants import parse_kv

    try:
        return parse_kv(value)
    except CodecllmError as e:
        raise ConfigError(f"--kv: {e}") from None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, codecllm checkpoint, or named config (random weights)")
    p.add_argument("--weights", choices=list(CODECS), help="compress on load with this codec")
    p.add_argument("--cache", default="auto",
                   help="weight-cache policy: none, per-pass, lru:K, pin:K, auto[:BYTES], all, fused")
    p.add_argument("--kv", default="on", help="KV cache: on, off, int8, int4, sliding:W[:SINKS], h2o:BUDGET[:RECENT]")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: as stored)")
    p.add_argument("--storage", default="gpu", choices=["gpu", "cpu"], help="where compressed bytes live")
    p.add_argument("--verbose", action="store_true", help="per-op HIT/MISS lines and per-token timing")


def _load(args) -> object:
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    return load(args.model, device=args.device or _default_device(), dtype=args.dtype, weights=args.weights,
                cache=args.cache, kv=_kv(args.kv), storage=args.storage, log=log)


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    prompt = model.encode(args.prompt)
    if not prompt:
        raise ConfigError("the prompt encodes to no tokens: give some text with -p")
    # the arguments are checked here, before the prompt is echoed
    tokens = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=model.stop_ids, stream=True)
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    count = 0
    for token in tokens:
        print(model.decode([token]), end="", flush=True)
        count += 1
    seconds = time.perf_counter() - start
    print()
    s = model.stats()
    print(f"[{count} tokens in {seconds:.2f}s, {count / seconds:.1f} tok/s; forward passes {s['forward_passes']}, "
          f"decompressions {s['decompressions']}, hit rate {s['hit_rate']:.1%}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from codecllm.generate import Sampling

    Sampling(args.temperature, seed=args.seed)  # checked before the first line is typed
    model = _load(args)
    context = model.config.max_position_embeddings
    if not 1 <= args.max_new_tokens < context:
        raise ConfigError(f"--max-new-tokens must be 1..{context - 1} (the model's context is {context} tokens, "
                          f"and a reply leaves room for the conversation), got {args.max_new_tokens}")
    print(f"codecllm chat: {args.model} (KV cache {model.kv}). Empty line or Ctrl-D quits.")
    history: list[int] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        history += model.encode(line + "\n")
        budget = model.config.max_position_embeddings - args.max_new_tokens
        history = history[-budget:]
        start, reply = time.perf_counter(), []
        for token in model.generate(history, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                    stop=model.stop_ids, stream=True):
            reply.append(token)
            print(model.decode([token]), end="", flush=True)
        seconds = time.perf_counter() - start
        print(f"\n[{len(reply)} tokens, {len(reply) / seconds:.1f} tok/s]")
        history += reply


def cmd_bench_kv(args: argparse.Namespace) -> int:
    from codecllm.bench import kv_bench as kb

    device = args.device or _default_device()
    model_name = args.kv_model or ("tinyllama-1.1b" if device.startswith("cuda") else "tiny")
    lengths = [int(x) for x in args.lengths.split(",")]
    speed = kb.speed_by_length(model_name, device, lengths)
    print(f"## Generation speed with and without a KV cache ({model_name}, {device})\n")
    print(kb.format_speed(speed))
    memory = kb.memory_by_config()
    print("\n## KV cache memory per sequence (`codecllm.kv.cache_bytes`)\n")
    print(kb.format_memory(memory))
    quality = kb.quantized_quality(load(model_name, device=device))
    print(f"\n## Quantized KV caches on a fixed text ({model_name}, teacher-forced, token by token)\n")
    print(kb.format_quality(quality))
    report = {"model": model_name, "device": device, "speed": speed, "memory": memory, "quality": quality}
    if args.json:
        from codecllm.report import environment

        report["environment"] = environment()
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        Path(args.plot).mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens"] for r in speed], [r["no_cache_tok_s"] for r in speed], marker="o", label="no cache")
        ax.plot([r["tokens"] for r in speed], [r["cache_tok_s"] for r in speed], marker="s", label="KV cache")
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"KV cache speedup by generation length ({model_name})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.plot) / "kv_speed.png", dpi=120)
        print(f"wrote {Path(args.plot) / 'kv_speed.png'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.model == "kv":
        return cmd_bench_kv(args)
    from codecllm.bench import engine_bench as eb

    device = args.device or _default_device()
    stored = eb.stored_codec(args.model)  # a checkpoint is measured with the codec it is stored with
    if stored and args.weights not in (None, stored):
        raise ConfigError(f"{args.model} is stored compressed with {stored}; --weights {args.weights} does not apply")
    args.weights = stored or args.weights or "huffman"
    policies = args.policies.split(",")
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None
    report: dict = {"model": args.model, "codec": args.weights, "device": device,
                    "max_new_tokens": args.max_new_tokens, "prompt": args.prompt}
    with eb.prepared_directories(args.model, args.weights) as (plain, compressed):
        baseline, results, prompt = eb.run_policies(plain, compressed, args.prompt, args.max_new_tokens,
                                                    policies, device, log=log)
        print(eb.results_summary(baseline, results, args.weights))
        print("\n## Policies\n")
        print(eb.policy_table(baseline, results))
        hit_rates = []
        if not args.skip_tables:
            layers = results[0].stats["compressed_layers"] if results else 0
            sizes = sorted({s for s in (10, 20, 50, 100, layers) if 0 < s <= layers})
            hit_rates = eb.hit_rate_table(compressed, prompt, args.max_new_tokens, device, sizes)
            print(f"\n## Hit rate by cache size ({args.max_new_tokens} tokens: one forward pass each; "
                  f"theory: a cyclic scan over the layers)\n")
            print(eb.format_hit_rates(hit_rates))
            memory = eb.memory_table(plain, args.weights, prompt, args.max_new_tokens, device)
            print("\n## Memory vs number of compressed blocks (per-pass cache)\n")
            print(eb.format_memory(memory))
        else:
            memory = []
    report.update(baseline=asdict(baseline), policies=[asdict(r) for r in results], hit_rates=hit_rates,
                  memory=memory)
    if args.json:
        from codecllm.report import environment

        report["environment"] = environment()
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.json}")
    if args.plot:
        from codecllm.bench.plots import write_plots

        for path in write_plots(args.plot, baseline, results, hit_rates, memory):
            print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_options(p)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    _add_model_options(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="baseline vs compressed: speed, memory, cache statistics ('bench kv': KV caches)")
    p.add_argument("model", nargs="?", default=None,
                   help="model directory, codecllm checkpoint (measured against its decoded original) or "
                        "named config (default: tiny on CPU, tinyllama-1.1b on a GPU); 'kv' runs the KV-cache "
                        "benchmark instead")
    p.add_argument("--kv-model", default=None, help="with 'bench kv': the model (default as above)")
    p.add_argument("--lengths", default="10,25,50,100,250,1000", help="with 'bench kv': generation lengths")
    p.add_argument("--weights", default=None, choices=[c for c in CODECS if c != "raw"],
                   help="codec (default: huffman; a checkpoint's own)")
    p.add_argument("--policies", default=",".join(("none", "per-pass", "lru:20", "pin:20", "auto:64MB", "all")))
    p.add_argument("-p", "--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--skip-tables", action="store_true", help="only the policy runs")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--plot", help="write PNG plots to this directory")
    p.set_defaults(func=cmd_bench)
