"""End-to-end generation on the GPU: codecllm (bf16 eager / CUDA graph / Triton GEMV, nibble fused,
huffman with prefetch) against Hugging Face transformers on the same random
weights, in the same run. bf16, batch 1 unless --batch says otherwise (B prompts of the same
length; tok/s then counts the tokens of all B sequences).

    python benchmarks/decode.py --model tinyllama-1.1b [--prompt 128] [--new 256] [--batch 1] [--skip hf,...]
    python benchmarks/decode.py --model llama-3.1-8b --skip hf,compile,triton,nibble,prefill \
        --name huffman-decode-llama-3.1-8b     (the huffman rows alone, kept apart from the main run)

Decode speed is measured on the decode steps alone: time(generate N) - time(generate 1), over N - 1
steps, median of 3 runs after a warm-up (a captured graph is reused, as a server would).
roofline_fraction = steps/s x (weight bytes + KV bytes read per step) / measured copy bandwidth;
the weight bytes a step reads leave out the embedding table (one row a sequence is read) unless
lm_head shares it (`step_bytes`).
nibble_vs_bf16_paired: the nibble graph against our bf16 Triton graph, both models loaded, timed in
turn (--pairs rounds, the order flipped every round), one ratio a round: rows measured a minute
apart differ by a few percent on their own (clocks, host), more than the two differ at batch 8.
nibble_vs_bf16_step_replay: the same two captured decode steps replayed alone from the prompt's
slot, timed in turn by CUDA events (`step_replays`): the GPU's time per token without the host's
per-token work (the token copy and Python loop of generate), within ~0.5% from round to round.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from unittest import mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, gpu_time_ms, write_result

import codecllm
from codecllm.codecs.kernels import pdl
from codecllm.kv import cache_bytes
from codecllm.report import format_table, human_bytes


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB, median of 10)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (gpu_time_ms(lambda: b.copy_(a), warmup=2, repeat=10) / 1e3)


def step_bytes(config, batch: int, held: int, prompt: int, new: int) -> float:
    """Bytes one decode step reads: the weights (`held` bytes of them in all) less the embedding
    table, of which a step reads one row a sequence (unless lm_head shares it, then all of it),
    plus the KV cache at the middle of the generation. A compressed model's share of the table is
    taken at its bytes' average rate."""
    full = config.parameter_count() * 2
    unread = 0 if config.tie_word_embeddings else (config.vocab_size - batch) * config.hidden_size * 2
    kv_read = cache_bytes(config, batch, prompt + new // 2, torch.bfloat16)
    return held * (1 - unread / full) + kv_read


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_speed(generate, new: int, batch: int = 1, runs: int = 3, warmup: bool = True) -> float:
    """Tokens/s of the decode steps: batch x (N - 1) / (time(N) - time(1)), each time the median of
    `runs`."""
    if warmup:
        generate(new)  # kernels, captured graph, caches
    full = statistics.median(timed(lambda: generate(new)) for _ in range(runs))
    first = statistics.median(timed(lambda: generate(1)) for _ in range(runs))
    return batch * (new - 1) / max(full - first, 1e-9)


def in_turn(timers: dict, rounds: int) -> dict:
    """Each timer's figure a round, the timers run in turn and the order flipped every round, so a
    drift in clocks or host load weighs on all of them alike."""
    order = list(timers)
    figures: dict = {label: [] for label in order}
    for i in range(rounds):
        for label in order if i % 2 == 0 else order[::-1]:
            figures[label].append(timers[label]())
    return figures


def ratio_rounds(candidate: list, reference: list) -> dict:
    """candidate / reference a round, and their median and range."""
    ratios = [c / r for c, r in zip(candidate, reference)]
    return {"rounds": len(ratios), "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "ratios": ratios}


def paired_ratio(reference, candidate, new: int, rounds: int) -> dict:
    """candidate's decode speed over reference's, one ratio per round, each round timing both in
    turn (time(N) - time(1), once each). Both generate functions are warm (their rows ran first)."""
    speeds = in_turn({"reference": lambda: decode_speed(reference, new, runs=1, warmup=False),
                      "candidate": lambda: decode_speed(candidate, new, runs=1, warmup=False)}, rounds)
    return ratio_rounds(speeds["candidate"], speeds["reference"])


def step_replays(models: dict, batch: int, first_slot: int, steps: int, rounds: int) -> dict:
    """Each model's captured decode step alone, timed in turn: `steps` replays of its graph from
    the prompt's slot on (DecodeGraph.time_steps), tok/s a round, and the ratio of the second model
    to the first a round. No host work between steps, so this is the GPU's time per token;
    decode_speed's rounds also time the host's per-token work, which makes them spread far more
    (10-25% at batch 1, against ~0.5% here)."""
    graphs = {}
    for label, model in models.items():
        fits = [g for g in model.decode_graphs if g.token.shape[0] == batch and g.cache.max_len >= first_slot + steps]
        graphs[label] = min(fits, key=lambda g: g.cache.max_len)  # the one its generate used
    for graph in graphs.values():
        graph.time_steps(steps, first_slot)  # warm
    speeds = in_turn({label: lambda g=graph: batch * steps / g.time_steps(steps, first_slot)
                      for label, graph in graphs.items()}, rounds)
    result = {label: {"median": statistics.median(v), "min": min(v), "max": max(v)} for label, v in speeds.items()}
    reference, candidate = graphs
    return {**result, "steps": steps, **ratio_rounds(speeds[candidate], speeds[reference])}


def same_steps(tokens, reference) -> int:
    """Decode steps, from the first, at which every sequence's token equals the reference's."""
    rows = zip(*(tokens, reference)) if tokens and isinstance(tokens[0], list) else [(tokens, reference)]
    return min(next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), len(t)) for t, r in rows)


def free_gpu_memory() -> None:
    """Models we are done with sit in reference cycles (a captured graph refers to its model):
    collect them before loading the next, or an 8B run holds several copies at once."""
    gc.collect()
    torch.cuda.empty_cache()


def check_prompts(prompts) -> None:
    """A batch of prompts is a list of token-id lists. A bare prompt would pass for a batch of
    one-token prompts: tok/s multiplied by its length (offload.py's 128x, fixed)."""
    if not prompts or not all(isinstance(p, list) for p in prompts):
        raise TypeError("takes a list of prompts, each a list of token ids")


def ours(model_name, prompts, new, weights=None, cache="auto", cuda_graphs=None, gemv="auto", storage="gpu",
         reuse=None):
    """One row: load (and encode) the model, or take `reuse` (a model of an earlier row with the
    same weights) and switch its cache policy: the 8B shape's huffman encode takes minutes.
    `prompts`: a list of prompts (token-id lists), one a sequence of the batch."""
    check_prompts(prompts)
    if reuse is not None:  # first, so that the copies the last policy kept are freed below
        reuse.set_cache(cache)
        reuse.cuda_graphs = cuda_graphs
    free_gpu_memory()
    torch.cuda.reset_peak_memory_stats()
    if reuse is None:
        before = torch.cuda.memory_allocated()  # what earlier rows left (kept out of this row's figures)
        model = codecllm.load(model_name, device="cuda", weights=weights, cache=cache, cuda_graphs=cuda_graphs,
                              storage=storage, gemv=gemv)
        model.memory_before = before
        load_peak = torch.cuda.max_memory_allocated() - before  # encoding runs at load: its own peak
    else:
        model, before, load_peak = reuse, reuse.memory_before, 0
    torch.cuda.reset_peak_memory_stats()
    tokens = {}

    def generate(n):
        tokens[n] = model.generate(prompts if len(prompts) > 1 else prompts[0], n)

    speed = decode_speed(generate, new, len(prompts))
    held = model.weight_bytes()
    result = {"tok_s": speed, "weights_held": held["weights_held"], "weights_original": held["weights_original"],
              "gpu_memory": torch.cuda.memory_allocated() - before,
              "peak": torch.cuda.max_memory_allocated() - before, "load_peak": load_peak,
              "tokens": tokens[new], "stats": model.stats(), "graphs": model.uses_cuda_graphs}
    model.timed_generate = generate  # for paired_ratio
    return model, result


def hf_model_from(model):
    """A transformers model with our model's weights (copied: built on the GPU, then loaded)."""
    import transformers

    config = transformers.AutoConfig.for_model(**model.config.to_hf())
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = hf.load_state_dict(model.module.state_dict(), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing[:3], unexpected[:3])
    return hf.eval()


def hf_generator(hf, prompts):
    """generate(n): exactly n greedy tokens from transformers' `generate` after each prompt."""
    check_prompts(prompts)
    ids = torch.tensor(prompts, device="cuda")

    def generate(n):
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return generate


def hf_eager(model, prompts, new):
    hf = hf_model_from(model)
    generate = hf_generator(hf, prompts)

    speed = decode_speed(generate, new, len(prompts))
    out = generate(new)[:, len(prompts[0]):].tolist()
    return hf, {"tok_s": speed, "tokens": out if len(prompts) > 1 else out[0]}


def hf_static_compile(hf, prompts, new):
    hf.generation_config.cache_implementation = "static"
    hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    generate = hf_generator(hf, prompts)

    try:
        return {"tok_s": decode_speed(generate, new, len(prompts))}
    except Exception as exc:  # noqa: BLE001 - its documented fast path may fail on this stack
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}


def prefill_speed(model_name, length, weights=None, cache="auto"):
    free_gpu_memory()
    model = codecllm.load(model_name, device="cuda", weights=weights, cache=cache, cuda_graphs=False)
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    model.generate(prompt, 1)
    seconds = statistics.median(timed(lambda: model.generate(prompt, 1)) for _ in range(3))
    return length / seconds


def report(payload: dict) -> str:
    """The table of rows, the paired rounds and prefill figures, and the run's settings."""
    rows, paired, env = payload["rows"], payload["nibble_vs_bf16_paired"], payload["environment"]
    table = format_table(["configuration", "tok/s", "roofline", "weights held", "+ kept decompressed",
                          "same tokens as bf16"],
                         [[label, f"{r['tok_s']:.1f}" if "tok_s" in r else r.get("error", "-"),
                           f"{r['roofline_fraction']:.2f}" if "roofline_fraction" in r else "-",
                           human_bytes(r["weights_held"]) if "weights_held" in r else "-",
                           human_bytes(r["stats"]["cache_bytes"]) if "stats" in r else "-",
                           {True: "yes", False: f"NO (first {r.get('same_steps_as_bf16')} steps)"}.get(
                               r.get("same_tokens_as_bf16"), "-")]
                          for label, r in rows.items()])
    lines = [table, ""]
    if paired:
        lines.append(f"nibble / bf16 (Triton GEMV) graph, timed in turn: median {paired['median']:.3f}x over "
                     f"{paired['rounds']} rounds ({paired['min']:.3f}-{paired['max']:.3f}), rounds: "
                     + " ".join(f"{r:.3f}" for r in paired["ratios"]))
    replayed = payload.get("nibble_vs_bf16_step_replay")
    if replayed:
        lines.append(f"decode steps replayed alone (GPU time, {replayed['steps']} steps, {replayed['rounds']} "
                     f"rounds in turn): bf16 {replayed['bf16']['median']:.1f} tok/s, nibble "
                     f"{replayed['nibble']['median']:.1f} tok/s, nibble / bf16 median {replayed['median']:.3f}x "
                     f"({replayed['min']:.3f}-{replayed['max']:.3f})")
    for label, tok_s in payload["prefill_tok_s"].items():
        lines.append(f"prefill {label}: {tok_s:.0f} tok/s")
    lines.append(f"{payload['model']}; prompt {payload['prompt']}, {payload['new']} new tokens, batch "
                 f"{payload['batch']}; copy bandwidth {payload['copy_bandwidth'] / 1e12:.2f} TB/s; {env['gpu']}; "
                 f"torch {env['torch']}; {env['date']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (1-8 take the GEMV kernels)")
    parser.add_argument("--skip", default="",
                        help="comma-separated: hf,compile,triton,nibble,nopdl,huffman,prefill (nopdl: the Triton "
                             "and nibble graphs again, captured without PDL launches)")
    parser.add_argument("--name", help="result file (default decode-MODEL, -bB for a batch, -pP for a prompt not 128)")
    parser.add_argument("--pairs", type=int, default=10,
                        help="rounds of nibble vs bf16 graph timed in turn (0: none)")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.pairs < 0:
        parser.error(f"--pairs must be 0 or more, got {args.pairs}")
    skip = set(args.skip.split(","))
    config = codecllm.models.ModelConfig.from_name(args.model)
    # sequence b's prompt: seed b (sequence 0 is the batch-1 run's prompt)
    prompts = [torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(b)).tolist()
               for b in range(args.batch)]
    bandwidth = copy_bandwidth()
    rows: dict[str, dict] = {}

    def record(label, result):
        rows[label] = result
        print(f"{label:40s} {result.get('tok_s', float('nan')):8.1f} tok/s  {result.get('error', '')}", flush=True)

    model, r = ours(args.model, prompts, args.new, cuda_graphs=False, gemv="cublas")
    record("codecllm bf16 eager (cuBLAS)", r)
    baseline_tokens = r["tokens"]
    if "hf" not in skip:
        hf, r = hf_eager(model, prompts, args.new)
        record("HF transformers eager", r)
        if "compile" not in skip:
            record("HF static cache + torch.compile", hf_static_compile(hf, prompts, args.new))
        del hf
        torch._dynamo.reset()  # the compiled forward (and its graph pools) keep the HF weights alive
        free_gpu_memory()
    del model
    model, r = ours(args.model, prompts, args.new, cuda_graphs=True, gemv="cublas")
    record("codecllm bf16 CUDA graph (cuBLAS)", r)
    graph_cublas_tokens = r["tokens"]
    del model
    bf16_graph = paired = replayed = None
    no_pdl = "nopdl" not in skip and pdl.enabled(torch.device("cuda"))

    def plain_launch_row(label, **options):  # the same graph captured without PDL launches (pdl.py)
        with mock.patch.dict(os.environ, {"CODECLLM_PDL": "0"}):
            record(label, ours(args.model, prompts, args.new, cuda_graphs=True, **options)[1])

    if "triton" not in skip:
        if no_pdl:
            plain_launch_row("codecllm bf16 CUDA graph (Triton GEMV, no PDL)")
        bf16_graph, r = ours(args.model, prompts, args.new, cuda_graphs=True)  # kept for the paired rounds
        record("codecllm bf16 CUDA graph (Triton GEMV)", r)
    if "nibble" not in skip:
        if no_pdl:
            plain_launch_row("codecllm nibble fused, CUDA graph (no PDL)", weights="nibble", cache="fused")
        model, r = ours(args.model, prompts, args.new, weights="nibble", cache="fused", cuda_graphs=True)
        record("codecllm nibble fused, CUDA graph", r)
        if bf16_graph is not None and args.pairs:
            paired = paired_ratio(bf16_graph.timed_generate, model.timed_generate, args.new, args.pairs)
            print(f"nibble / bf16 (Triton GEMV) graph, {args.pairs} paired rounds: median {paired['median']:.3f}x "
                  f"({paired['min']:.3f}-{paired['max']:.3f})", flush=True)
            replayed = step_replays({"bf16": bf16_graph, "nibble": model}, args.batch, args.prompt, args.new - 1,
                                    args.pairs)
            print(f"nibble / bf16 step graphs replayed alone, {args.pairs} rounds: median {replayed['median']:.3f}x "
                  f"({replayed['min']:.3f}-{replayed['max']:.3f})", flush=True)
        del model
    del bf16_graph
    if "huffman" not in skip:  # encoded once, each policy set on the same model
        model = None
        for fraction in (0.0, 0.1, 0.5):
            budget = int(config.parameter_count() * 2 * fraction)
            model, r = ours(args.model, prompts, args.new, weights="huffman", cache=f"auto:{budget}", reuse=model)
            record(f"codecllm huffman auto {fraction:.0%} kept", r)
        # the same decode work without the host: decode + matmul per weight, replayed as a graph
        model, r = ours(args.model, prompts, args.new, weights="huffman", cache="none", cuda_graphs=True, reuse=model)
        record("codecllm huffman none, CUDA graph", r)
        del model

    weight_bytes = config.parameter_count() * 2
    for label, r in rows.items():
        if "tok_s" in r and "weights_held" in r:
            held = r["weights_held"] if "nibble" in label else weight_bytes
            bytes_per_step = step_bytes(config, args.batch, held, args.prompt, args.new)
            r["roofline_fraction"] = r["tok_s"] / args.batch * bytes_per_step / bandwidth
            # Greedy tokens of random-weight models flip on near-ties when the summation order
            # changes (a graph attends over the padded cache bucket, our GEMVs tile differently),
            # so each row is compared with the bf16 run that computes the same way: decompressed
            # weights (huffman) with the cuBLAS graph run, everything else with the eager run.
            reference = graph_cublas_tokens if "huffman" in label and graph_cublas_tokens else baseline_tokens
            if "tokens" in r:
                r["same_tokens_as_bf16"] = r["tokens"] == reference
                r["same_steps_as_bf16"] = same_steps(r["tokens"], reference)
    prefill = {}
    if "prefill" not in skip:
        cases = [("bf16", None, "auto"), ("nibble (decompress per layer)", "nibble", "fused")]
        if "huffman" not in skip:
            cases.append(("huffman (decompress per layer)", "huffman", "none"))
        for label, weights, cache in cases:
            length = min(2048, config.max_position_embeddings - 1)
            prefill[label] = prefill_speed(args.model, length, weights, cache)
            print(f"prefill {length} {label:34s} {prefill[label]:9.0f} tok/s", flush=True)

    env = environment()
    for r in rows.values():
        r.pop("tokens", None)
    payload = {"model": args.model, "prompt": args.prompt, "new": args.new, "batch": args.batch,
               "copy_bandwidth": bandwidth,
               "rows": rows, "nibble_vs_bf16_paired": paired, "nibble_vs_bf16_step_replay": replayed,
               "prefill_tok_s": prefill, "environment": env}
    text = report(payload)
    print(f"\n{text}")
    name = args.name or (f"decode-{args.model}" + (f"-b{args.batch}" if args.batch > 1 else "")
                         + (f"-p{args.prompt}" if args.prompt != 128 else ""))
    print(f"wrote {write_result(name, payload, text)}")


if __name__ == "__main__":
    main()
