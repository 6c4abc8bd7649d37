"""Where GPU decode time goes: one eager `decode()` call vs the device time of the decode, per
codec, on one large tensor and on the weight shapes of real models (small matrices expose latency).

    python benchmarks/decode_profile.py [--numel 33554432] [--models tinyllama-1.1b,llama-3.1-8b]

Writes benchmarks/results/decode_profile-<gpu>.json. L2 is defeated by rotating over copies of
the encoded data (>= 256 MB in all), as in codecs.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, gpu_time_ms, graph_time_ms, rotating, write_result  # noqa: E402

import codecllm  # noqa: E402
from codecllm.models import ModelConfig  # noqa: E402
from codecllm.report import format_table  # noqa: E402


def copies_of(encoded, nbytes):
    """Enough device copies to defeat L2, each decoded once so its derived state is built
    (what a model's weights have after their first use)."""
    copies = [encoded.to("cuda") for _ in range(min(64, max(1, -(-(256 << 20) // max(nbytes, 1)))))]
    for copy in copies:
        codecllm.decode(copy, verify=False)
    return copies


def profile(w: torch.Tensor, name: str) -> dict:
    """One weight's decode, three ways: a single eager `decode()` call (the host's Python,
    allocation and Triton launch included, as an eager forward pass sees it), calls enqueued back
    to back (device time, host hidden when the GPU is the slower side), and replayed from a CUDA
    graph (no host at all: what a captured decode step sees)."""
    out_bytes = w.numel() * 2
    encoded = codecllm.encode(w, name)
    copies = copies_of(encoded, encoded.nbytes)
    pick = rotating(copies)

    def run():
        return codecllm.decode(pick(), verify=False)

    row = {"shape": list(w.shape), "codec": name}
    for key, ms in (("call", gpu_time_ms(run)), ("back_to_back", gpu_time_ms(run, calls=10)),
                    ("graph", graph_time_ms(run, calls=min(20, 4 * len(copies))))):
        row.update({f"{key}_us": ms * 1e3, f"{key}_gbps": out_bytes / ms / 1e6})
    return row


def model_shapes(names: list[str]) -> list[tuple[int, int]]:
    shapes = []
    for name in names:
        c = ModelConfig.from_name(name)
        kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
        for shape in [(kv, c.hidden_size), (c.hidden_size, c.hidden_size), (c.intermediate_size, c.hidden_size),
                      (c.vocab_size, c.hidden_size)]:
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def report(payload: dict) -> str:
    """The decode-time table and the run's settings, from the payload alone."""
    ways = ("call", "back_to_back", "graph")
    env = payload["environment"]
    table = format_table(["shape", "codec", "one decode() call", "back to back", "in a CUDA graph"],
                         [["x".join(map(str, r["shape"])), r["codec"]]
                          + [f"{r[f'{k}_us']:.1f} us = {r[f'{k}_gbps']:.0f} GB/s" for k in ways]
                          for r in payload["rows"]])
    return f"{table}\n\n{env['gpu']}; torch {env['torch']}; triton {env['triton']}; {env['date']}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--models", default="tinyllama-1.1b,llama-3.1-8b")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in ("huffman", "nibble"):
        rows.append(profile((torch.randn(args.numel, generator=g) * 0.02).bfloat16(), name))
    for n, k in model_shapes([m for m in args.models.split(",") if m]):
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
        for name in ("huffman", "nibble"):
            rows.append(profile(w, name))
    payload = {"numel": args.numel, "models": args.models, "rows": rows, "environment": environment()}
    text = report(payload)
    print(text)
    print(f"wrote {write_result('decode_profile', payload, text)}")


if __name__ == "__main__":
    main()
