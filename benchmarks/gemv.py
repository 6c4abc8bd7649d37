"""GEMV microbenchmark: cuBLAS bf16 (F.linear), our Triton bf16 GEMV, and the fused nibble GEMV,
per matrix shape of the tinyllama-1.1b and llama-3.1-8b decode steps, batch 1-8; then, at the same batches,
the launches the decode step really makes: q/k/v in one launch and gate/up with SiLU in one
(cuBLAS: the separate F.linear calls, and F.silu(gate) * up).

    python benchmarks/gemv.py [--batches 1,2,4,8] [--sweep]

Each kernel is timed inside a CUDA graph that calls it once on each of several copies of the
weights, at least 4 and enough for 256 MB of bf16 (median of 20 replays; host launch overhead out, as
in a graph-captured decode step): a decode step never finds a layer's weights in the 50 MB L2 cache,
so the benchmark must not either. The effective bandwidth counts the weight bytes each
format must read (2 B/weight for bf16, 1.5 B/weight + escapes for nibble). Accuracy: relative
error against an fp64 reference on the same fresh random inputs.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, graph_time_ms, rotating, write_result

import codecllm
from codecllm.codecs.kernels.gemv import NibbleGemvWeight, gemv, gemv_group
from codecllm.report import format_table

SHAPES = {  # (out_features N, in_features K): the distinct linears of one block, and lm_head
    "tinyllama-1.1b": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (32000, 2048)],
    "llama-3.1-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)],
}
COPIES = 4
L2_FLUSH_BYTES = 256 << 20
SWEEP_BATCH_SHAPES = {(2048, 2048), (256, 2048), (2048, 5632), (1024, 4096), (4096, 4096), (14336, 4096),
                      (4096, 14336)}


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def weight_copies(shapes: list[tuple[int, int]], seed: int):
    """Random bf16 matrices of `shapes` (one input width) and their nibble encodings, in enough
    copies (at least COPIES) that a pass over them is more than L2_FLUSH_BYTES of bf16; built once
    and timed at every batch. Returns (bf16 copies, nibble copies, generator for the inputs)."""
    k = shapes[0][1]
    copies = max(COPIES, -(-L2_FLUSH_BYTES // sum(n * k * 2 for n, _ in shapes)))
    g = torch.Generator(device="cuda").manual_seed(seed)
    weights = [[(torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16() for n, _ in shapes]
               for _ in range(copies)]
    fused = [[NibbleGemvWeight(codecllm.encode(w, "nibble").to("cuda")) for w in ws] for ws in weights]
    return weights, fused, g


def bench_shape(made, batch: int, configs=None, kernels=("nibble", "triton_bf16")) -> dict:
    """One matrix (`made`: weight_copies of one shape) at one batch. configs: {kernel: [config
    tuples to time besides the default]}."""
    bf16_copies, nibble_copies, g = made
    weights, fused = [ws[0] for ws in bf16_copies], [ws[0] for ws in nibble_copies]
    copies = len(weights)
    n, k = weights[0].shape
    x = torch.randn(batch, k, device="cuda", generator=g).bfloat16()
    ref = x.double() @ weights[0].double().T
    errors = {"cublas": rel_error(F.linear(x, weights[0]), ref), "triton_bf16": rel_error(gemv(x, weights[0]), ref),
              "nibble": rel_error(fused[0](x), ref)}
    pick = rotating(range(copies))  # each call reads another copy: L2 never holds the weights
    times = {
        "cublas": graph_time_ms(lambda: F.linear(x, weights[pick()]), calls=copies),
        "triton_bf16": graph_time_ms(lambda: gemv(x, weights[pick()]), calls=copies),
        "nibble": graph_time_ms(lambda: fused[pick()](x), calls=copies),
    }
    sweep = {}
    for name in kernels:
        for config in (configs or {}).get(name, []):
            fn = {"nibble": lambda i, c=config: fused[i](x, config=c),
                  "triton_bf16": lambda i, c=config: gemv(x, weights[i], config=c)}[name]
            try:
                sweep[f"{name} {config}"] = graph_time_ms(lambda fn=fn: fn(pick()), calls=copies, repeat=10)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
                sweep[f"{name} {config}"] = f"failed: {type(exc).__name__}"
    nibble_bytes = fused[0].sign_mantissa.numel() * 1.5 + fused[0].escapes * 24
    best_bf16 = min(times["cublas"], times["triton_bf16"])
    return {"n": n, "k": k, "batch": batch, "ms": times, "errors": errors, "sweep": sweep,
            "gbps": {"cublas": n * k * 2 / times["cublas"] / 1e6, "triton_bf16": n * k * 2 / times["triton_bf16"] / 1e6,
                     "nibble": nibble_bytes / times["nibble"] / 1e6},
            "nibble_vs_best_bf16": best_bf16 / times["nibble"],
            "triton_vs_cublas": times["cublas"] / times["triton_bf16"]}


def groups(model: str) -> dict[str, list[tuple[int, int]]]:
    config = codecllm.models.ModelConfig.from_name(model)
    h, q, kv, f = (config.hidden_size, config.num_attention_heads * config.head_dim,
                   config.num_key_value_heads * config.head_dim, config.intermediate_size)
    return {"q/k/v": [(q, h), (kv, h), (kv, h)], "gate/up + SiLU": [(f, h), (f, h)]}


def bench_group(name: str, shapes: list[tuple[int, int]], made, batch: int) -> dict:
    """One grouped launch (gated for gate/up; `made`: weight_copies of `shapes`) against cuBLAS's
    separate launches."""
    gated = "SiLU" in name
    k = shapes[0][1]
    group_bytes = sum(n * k * 2 for n, _ in shapes)
    weights, fused, g = made
    copies = len(weights)
    x = torch.randn(batch, k, device="cuda", generator=g).bfloat16()
    pick = rotating(range(copies))

    def cublas():
        outs = [F.linear(x, w) for w in weights[pick()]]
        return F.silu(outs[0]) * outs[1] if gated else outs

    times = {"cublas": graph_time_ms(cublas, calls=copies),
             "triton_bf16": graph_time_ms(lambda: gemv_group(x, weights[pick()], gated=gated), calls=copies),
             "nibble": graph_time_ms(lambda: gemv_group(x, fused[pick()], gated=gated), calls=copies)}
    nibble_bytes = sum(w.sign_mantissa.numel() * 1.5 + w.escapes * 24 for w in fused[0])
    return {"group": name, "shapes": shapes, "batch": batch, "ms": times,
            "gbps": {"cublas": group_bytes / times["cublas"] / 1e6,
                     "triton_bf16": group_bytes / times["triton_bf16"] / 1e6,
                     "nibble": nibble_bytes / times["nibble"] / 1e6},
            "nibble_vs_best_bf16": min(times["cublas"], times["triton_bf16"]) / times["nibble"]}


def report(payload: dict) -> str:
    """The single-matrix table, the grouped-launch table and the environment line, from the
    payload alone."""
    rows, grouped, env = payload["rows"], payload["grouped"], payload["environment"]
    single = format_table(
        ["model", "N x K", "batch", "cuBLAS bf16", "Triton bf16", "nibble fused", "nibble vs best bf16",
         "nibble GB/s", "err cuBLAS", "err nibble"],
        [[r["model"], f"{r['n']}x{r['k']}", r["batch"], f"{r['ms']['cublas'] * 1e3:.1f} us",
          f"{r['ms']['triton_bf16'] * 1e3:.1f} us", f"{r['ms']['nibble'] * 1e3:.1f} us",
          f"{r['nibble_vs_best_bf16']:.2f}x", f"{r['gbps']['nibble']:.0f}", f"{r['errors']['cublas']:.1e}",
          f"{r['errors']['nibble']:.1e}"] for r in rows])
    launches = format_table(
        ["model", "launch", "matrices", "batch", "cuBLAS bf16", "Triton bf16", "nibble fused", "nibble vs best bf16",
         "nibble GB/s"],
        [[r["model"], r["group"], " + ".join(f"{n}x{k}" for n, k in r["shapes"]), r["batch"],
          f"{r['ms']['cublas'] * 1e3:.1f} us",
          f"{r['ms']['triton_bf16'] * 1e3:.1f} us", f"{r['ms']['nibble'] * 1e3:.1f} us",
          f"{r['nibble_vs_best_bf16']:.2f}x", f"{r['gbps']['nibble']:.0f}"] for r in grouped])
    return f"{single}\n\n{launches}\n\n{env['gpu']}; torch {env['torch']}; triton {env['triton']}; {env['date']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--sweep", action="store_true", help="also time block-size variants at batch 1, every shape")
    parser.add_argument("--sweep-batch", action="store_true",
                        help="also time block-size variants (tensor cores and CUDA cores) at batches 4 and 8 on "
                             "seven shapes")
    args = parser.parse_args()
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for model, shapes in SHAPES.items():
        for n, k in shapes:
            made = weight_copies([(n, k)], seed=n * 31 + k)
            for batch in batches:
                configs, kernels = None, ("nibble", "triton_bf16")
                if batch == 1 and args.sweep:
                    configs = dict.fromkeys(kernels, list(itertools.product((1, 2, 4), (1024, 2048), (1, 2, 4, 8),
                                                                            (1,), (False,))))
                elif batch in (4, 8) and args.sweep_batch and (n, k) in SWEEP_BATCH_SHAPES:
                    # tensor cores (nibble: 16-row tiles, BK 128 = loads a loop turn ahead; stages 1:
                    # registers only; 2 warps and K split 8 at BK 128) and CUDA cores (a few rows a
                    # program, each weight read once): session 28's scratch/small_sweep.py set
                    nibble_tc = list(itertools.product((16,), (64, 128, 256), (4, 8), (1, 2, 4), (True,), (1,)))
                    nibble_tc += [(16, 128, 2, s, True, 1) for s in (1, 2, 4, 8)] + [(16, 128, w, 8, True, 1)
                                                                                      for w in (4, 8)]
                    configs = {"nibble": nibble_tc + list(itertools.product((1, 2), (1024, 2048), (2, 4, 8), (1,),
                                                                            (False,))),
                               "triton_bf16": list(itertools.product((16, 32, 64), (64, 128, 256), (4,),
                                                                     (1, 2, 4, 8), (True,)))
                               + list(itertools.product((1, 2, 4), (1024, 2048), (4,), (1,), (False,)))}
                r = bench_shape(made, batch, configs, kernels)
                r["model"] = model
                rows.append(r)
                for kernel in kernels:
                    timings = [(v, c) for c, v in r["sweep"].items() if c.startswith(kernel) and isinstance(v, float)]
                    if timings:
                        best = min(timings)
                        print(f"sweep {n}x{k} b{batch}: best {best[1]} {best[0] * 1e3:.1f} us "
                              f"(default {r['ms'][kernel] * 1e3:.1f} us)", flush=True)
            del made
    grouped = []
    for model in SHAPES:
        for name, shapes in groups(model).items():
            made = weight_copies(shapes, seed=shapes[0][1])
            for batch in batches:
                r = bench_group(name, shapes, made, batch)
                r["model"] = model
                grouped.append(r)
            del made
    payload = {"rows": rows, "grouped": grouped, "environment": environment()}
    text = report(payload)
    print(text)
    print(f"wrote {write_result('gemv', payload, text)}")


if __name__ == "__main__":
    main()
