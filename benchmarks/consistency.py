"""Do all paths produce the baseline's tokens on a long greedy generation? Where they do not,
where do they first diverge, and does a path disagree with itself across runs (a race)?

    python benchmarks/consistency.py [--model tinyllama-1.1b] [--new 256]
"""

from __future__ import annotations

import argparse

import torch

import codecllm


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms (set CUBLAS_WORKSPACE_CONFIG=:4096:8 too)")
    parser.add_argument("--cases", default="", help="comma-separated labels to run (default: all)")
    args = parser.parse_args()
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    config = codecllm.models.ModelConfig.from_name(args.model)
    prompt = torch.randint(0, config.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = {}
    cases = [("bf16 eager", None, "auto", False), ("bf16 graph", None, "auto", True),
             ("huffman auto:10% graph", "huffman", f"auto:{int(config.parameter_count() * 0.2)}", True),
             ("nibble fused graph", "nibble", "fused", True), ("nibble fused eager", "nibble", "fused", False),
             ("huffman auto:10% eager", "huffman", f"auto:{int(config.parameter_count() * 0.2)}", False),
             ("huffman pin:20 eager", "huffman", "pin:20", False), ("huffman none eager", "huffman", "none", False)]
    wanted = set(args.cases.split(",")) if args.cases else None
    for label, weights, cache, graphs in cases:
        if wanted and label not in wanted and label != "bf16 eager":
            continue
        model = codecllm.load(args.model, device="cuda", weights=weights, cache=cache, cuda_graphs=graphs)
        outs = [model.generate(prompt, args.new) for _ in range(3)]
        runs[label] = outs[0]
        moved = [d for d in (first_difference(o, outs[0]) for o in outs[1:]) if d is not None]
        stable = "yes" if not moved else f"NO (runs differ from token {min(moved)})"
        diff = first_difference(outs[0], runs["bf16 eager"])
        print(f"{label:26s} stable across 3 runs: {stable}; first difference from bf16 eager: {diff}", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
