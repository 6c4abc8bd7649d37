"""Where GPU decode time goes: the kernel alone vs the whole `decode()` call, per codec, on one
large tensor and on the weight shapes of real models (small matrices expose latency).

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
from common import gpu_time_ms, rotating, write_result  # noqa: E402

import codecllm  # noqa: E402
from codecllm.codecs.huffman import HuffmanCodec  # noqa: E402
from codecllm.codecs.kernels.huffman_decode import huffman_decode  # noqa: E402
from codecllm.codecs.kernels.nibble_decode import nibble_decode  # noqa: E402
from codecllm.codecs.nibble import NibbleCodec  # noqa: E402
from codecllm.models import ModelConfig  # noqa: E402
from codecllm.report import format_table  # noqa: E402


def copies_of(encoded, nbytes):
    """Enough device copies to defeat L2, each decoded once so its derived state is built
    (what a model's weights have after their first use)."""
    copies = [encoded.to("cuda") for _ in range(min(64, max(1, -(-(256 << 20) // max(nbytes, 1)))))]
    for copy in copies:
        codecllm.decode(copy, verify=False)
    return copies


def profile(w: torch.Tensor, name: str, kernel_too: bool) -> dict:
    out_bytes = w.numel() * 2
    encoded = codecllm.encode(w, name)
    pick = rotating(copies_of(encoded, encoded.nbytes))
    whole = gpu_time_ms(lambda: codecllm.decode(pick(), verify=False))
    row = {"shape": list(w.shape), "codec": name, "decode_us": whole * 1e3, "decode_gbps": out_bytes / whole / 1e6}
    if kernel_too:
        e = pick()
        if name == "huffman":
            layout, rest, stream, offsets, table, steps, code_bits, _, _ = HuffmanCodec.parts(e)
            kernel = gpu_time_ms(
                lambda: huffman_decode(layout, rest, stream, offsets, table, steps, code_bits, e.numel))
        else:
            sm, codes, _, _, base = NibbleCodec._parts(e)
            kernel = gpu_time_ms(lambda: nibble_decode(sm, codes, base, e.numel))
        row.update(kernel_us=kernel * 1e3, kernel_gbps=out_bytes / kernel / 1e6)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--models", default="tinyllama-1.1b,llama-3.1-8b")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for name in ("huffman", "nibble"):
        rows.append(profile((torch.randn(args.numel, generator=g) * 0.02).bfloat16(), name, kernel_too=True))
    for n, k in model_shapes([m for m in args.models.split(",") if m]):
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
        for name in ("huffman", "nibble"):
            rows.append(profile(w, name, kernel_too=False))
    print(format_table(["shape", "codec", "decode() us", "GB/s", "kernel alone us", "GB/s"],
                       [["x".join(map(str, r["shape"])), r["codec"], f"{r['decode_us']:.1f}", f"{r['decode_gbps']:.0f}",
                         f"{r['kernel_us']:.1f}" if "kernel_us" in r else "-",
                         f"{r['kernel_gbps']:.0f}" if "kernel_gbps" in r else "-"] for r in rows]))
    print(f"wrote {write_result('decode_profile', {'rows': rows})}")


if __name__ == "__main__":
    main()
