"""DFloat11's own model path against codecllm huffman, on the same random weights, in one run.

    python benchmarks/dfloat11_model.py --model tinyllama-1.1b [--prompt 128] [--new 256] [--workers 16]

Rows: Hugging Face transformers eager on the bf16 weights (the model DFloat11 wraps), the same
model loaded through `DFloat11Model.from_pretrained` (DFloat11 0.5.0: its forward pre-hooks
decode each transformer block's weights with its CUDA kernel before the block runs), and
codecllm huffman with the `auto` policy at 0% kept (CUDA graph) and bf16 for reference.

DFloat11's encoder is a pure-Python loop (~1.4 M weights/s), so the compression that its
`compress_model` would do block by block runs here in a process pool, each block encoded by
DFloat11's own functions (get_codec, get_32bit_codec, get_luts, encode_weights) and saved in the
layout `compress_model(save_single_file=False)` writes: one safetensors file per block and a
config.json holding `dfloat11_config`. Loading then goes through DFloat11's own code.

Decode speed is measured as in decode.py: (N - 1) / (time(N) - time(1)), median of 3 runs.
Writes benchmarks/results/dfloat11_model-<model>-<gpu>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402
from decode import decode_speed, free_gpu_memory, hf_generator, hf_model_from, ours  # noqa: E402

import codecllm  # noqa: E402
from codecllm.report import format_table, human_bytes  # noqa: E402

# DFloat11's pattern for Llama models: each decoder block is decoded as one buffer.
PATTERNS = {
    r"lm_head": [],
    r"model\.embed_tokens": [],
    r"model\.layers\.\d+": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
}


def dfloat11_utils():
    """DFloat11's encoder module alone: importing the package runs dfloat11/__init__, which loads
    its CUDA kernel through cupy (a CUDA context in every worker process)."""
    import importlib.util

    package = importlib.util.find_spec("dfloat11")
    path = Path(package.submodule_search_locations[0]) / "dfloat11_utils.py"
    spec = importlib.util.spec_from_file_location("dfloat11_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encode_block(weights: list[torch.Tensor], bytes_per_thread: int, threads: int) -> dict[str, torch.Tensor]:
    """One block through DFloat11's encoder, as compress_model does (its prints silenced)."""
    utils = dfloat11_utils()
    encode_weights, get_32bit_codec, get_codec, get_luts = (
        utils.encode_weights, utils.get_32bit_codec, utils.get_codec, utils.get_luts)

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, counter = get_codec(torch.cat(weights))
        codec, _, table = get_32bit_codec(counter)
        luts = get_luts(table)
        encoded, other, positions, gaps, splits = encode_weights(weights, codec, bytes_per_thread, threads)
    return {"luts": luts, "encoded_exponent": encoded, "sign_mantissa": other,
            "output_positions": positions.view(torch.uint8), "gaps": gaps, "split_positions": splits}


def blocks_of(hf) -> list[tuple[str, list[torch.Tensor]]]:
    """(module name, its weights flattened on the CPU) for every module DFloat11 compresses."""
    blocks = []
    for name, module in hf.named_modules():
        for pattern, attrs in PATTERNS.items():
            if re.fullmatch(pattern, name):
                targets = [module.get_submodule(a) for a in attrs] if attrs else [module]
                blocks.append((name, [t.weight.detach().reshape(-1).cpu() for t in targets]))
    return blocks


def compress(hf, directory: Path, workers: int) -> tuple[int, list]:
    """Write DFloat11's on-disk layout for `hf`'s weights; returns the compressed bytes and the
    blocks' original weights (to check what DFloat11 decodes)."""
    from dfloat11 import dfloat11 as df
    from safetensors.torch import save_file

    blocks = blocks_of(hf)
    total = 0
    context = multiprocessing.get_context("spawn")  # the parent holds CUDA: no fork
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        jobs = pool.map(encode_block, [w for _, w in blocks], [df.bytes_per_thread] * len(blocks),
                        [df.threads_per_block[0]] * len(blocks))
        for (name, _), buffers in zip(blocks, jobs):
            total += sum(b.numel() * b.element_size() for b in buffers.values())
            save_file({f"{name}.{k}": v.contiguous() for k, v in buffers.items()},
                      str(directory / f"{name.replace('.', '_')}.safetensors"))
    config = {"version": df.version, "threads_per_block": df.threads_per_block,
              "bytes_per_thread": df.bytes_per_thread, "pattern_dict": PATTERNS}
    (directory / "config.json").write_text(json.dumps({"dfloat11_config": config}))
    return total, blocks


def decodes_bit_identical(model, blocks) -> bool:
    """Run each compressed module's DFloat11 decode hook and compare the weights it injects with
    the originals, bit for bit (the hooks share one output buffer: check each right away)."""
    for name, originals in blocks:
        module = model.get_submodule(name)
        for hook in module._forward_pre_hooks.values():
            hook(module, ())
        attrs = PATTERNS[next(p for p in PATTERNS if re.fullmatch(p, name))]
        targets = [module.get_submodule(a) for a in attrs] if attrs else [module]
        for target, original in zip(targets, originals):
            if not torch.equal(target.weight.reshape(-1).view(torch.int16).cpu(), original.view(torch.int16)):
                return False
    return True


def hf_generate(hf, prompt, new) -> dict:
    generate = hf_generator(hf, [prompt])

    torch.cuda.reset_peak_memory_stats()
    speed = decode_speed(generate, new)
    tokens = generate(new)[0, len(prompt):].tolist()
    return {"tok_s": speed, "tokens": tokens, "peak": torch.cuda.max_memory_allocated(),
            "repeatable": generate(new)[0, len(prompt):].tolist() == tokens}


def report(payload: dict) -> str:
    """The table (each row's greedy tokens against the bf16 run that computes the same way) and
    the run's settings, from the payload alone."""
    rows, env = payload["rows"], payload["environment"]
    original = rows["HF transformers eager, bf16"]["weights_held"]

    def tokens_cell(r):
        if "same_tokens" not in r:
            return "-"
        if r["same_tokens"]:
            return f"same as {r['same_tokens_as']}"
        return f"differ from {r['same_tokens_as']} from token {r['first_different_token']}"

    table = format_table(["configuration", "tok/s", "weights held", "of bf16", "peak GPU memory", "repeatable",
                          "weights bit-identical", "greedy tokens"],
                         [[label, f"{r['tok_s']:.1f}", human_bytes(r["weights_held"]),
                           f"{r['weights_held'] / original:.1%}", human_bytes(r["peak"]),
                           {True: "yes", False: "NO"}.get(r.get("repeatable"), "-"),
                           {True: "yes", False: "NO"}.get(r.get("bit_identical"), "-"), tokens_cell(r)]
                          for label, r in rows.items()])
    return (f"{table}\n\n{payload['model']}; prompt {payload['prompt']}, {payload['new']} new tokens, batch 1; "
            f"{env['gpu']}; torch {env['torch']}; {env['date']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    args = parser.parse_args()
    from dfloat11 import dfloat11 as df

    config = codecllm.models.ModelConfig.from_name(args.model)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    rows: dict[str, dict] = {}

    def record(label, result):
        rows[label] = result
        print(f"{label:44s} {result['tok_s']:8.1f} tok/s", flush=True)

    model = codecllm.load(args.model, device="cuda", cuda_graphs=False, gemv="cublas")
    hf = hf_model_from(model)
    del model
    free_gpu_memory()
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    record("HF transformers eager, bf16", {**hf_generate(hf, prompt, args.new), "weights_held": weights})

    with tempfile.TemporaryDirectory() as tmp:
        compressed, blocks = compress(hf, Path(tmp), args.workers)
        with contextlib.redirect_stderr(io.StringIO()):
            hf = df.DFloat11Model.from_pretrained(tmp, bfloat16_model=hf, device="cuda")
    free_gpu_memory()
    held = sum(p.numel() * p.element_size() for p in hf.parameters()) + compressed
    record("DFloat11Model (HF eager + DFloat11 0.5.0)", {**hf_generate(hf, prompt, args.new), "weights_held": held,
                                                         "bit_identical": decodes_bit_identical(hf, blocks)})
    del blocks
    del hf
    free_gpu_memory()

    # cuBLAS for the bf16 graph row: the huffman rows multiply decoded weights with cuBLAS too,
    # so the two sum in the same order (greedy tokens of random weights flip on near-ties).
    runs = (("codecllm bf16 CUDA graph (cuBLAS)", None, "auto", "cublas"),
            ("codecllm huffman auto 0% kept, CUDA graph", "huffman", "auto:0", "auto"))
    for label, weights_kind, cache, gemv in runs:
        model, r = ours(args.model, [prompt], args.new, weights=weights_kind, cache=cache, cuda_graphs=True, gemv=gemv)
        record(label, r)
        del model

    # Each row against the bf16 run that computes the same way.
    references = {"DFloat11Model (HF eager + DFloat11 0.5.0)": "HF transformers eager, bf16",
                  "codecllm huffman auto 0% kept, CUDA graph": "codecllm bf16 CUDA graph (cuBLAS)"}
    for label, r in rows.items():
        if label in references:
            r["same_tokens_as"] = references[label]
            reference = rows[references[label]]["tokens"]
            r["same_tokens"] = r["tokens"] == reference
            r["first_different_token"] = next((i for i, pair in enumerate(zip(r["tokens"], reference))
                                               if pair[0] != pair[1]), None)
    for r in rows.values():
        r.pop("tokens")
        r.pop("stats", None)
    payload = {"model": args.model, "prompt": args.prompt, "new": args.new, "rows": rows, "environment": environment()}
    text = report(payload)
    print(f"\n{text}")
    print(f"wrote {write_result(f'dfloat11_model-{args.model}', payload, text)}")


if __name__ == "__main__":
    main()
