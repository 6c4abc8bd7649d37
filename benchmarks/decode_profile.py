"""Where GPU decode time goes: the kernel alone vs the whole `decode()` call, per codec.

    python benchmarks/decode_profile.py [--numel 33554432]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import gpu_time_ms  # noqa: E402

import codecllm  # noqa: E402
from codecllm.codecs.huffman import HuffmanCodec  # noqa: E402
from codecllm.codecs.kernels.huffman_decode import huffman_decode  # noqa: E402
from codecllm.codecs.kernels.nibble_decode import nibble_decode  # noqa: E402
from codecllm.codecs.nibble import NibbleCodec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=32 * 1024 * 1024)
    args = parser.parse_args()
    w = (torch.randn(args.numel, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    out_bytes = w.numel() * 2
    for name in ("huffman", "nibble"):
        e = codecllm.encode(w, name).to("cuda")
        whole = gpu_time_ms(lambda e=e: codecllm.decode(e, verify=False))
        if name == "huffman":
            layout, rest, stream, offsets, table, steps, code_bits, _, _ = HuffmanCodec.parts(e)
            kernel = gpu_time_ms(lambda: huffman_decode(layout, rest, stream, offsets, table, steps, code_bits,
                                                        e.numel))
        else:
            sm, codes, _, _, base = NibbleCodec._parts(e)
            kernel = gpu_time_ms(lambda sm=sm, codes=codes, base=base: nibble_decode(sm, codes, base, e.numel))
        print(f"{name:8s} decode() {whole:7.3f} ms = {out_bytes / whole / 1e6:6.0f} GB/s | kernel alone "
              f"{kernel:7.3f} ms = {out_bytes / kernel / 1e6:6.0f} GB/s")


if __name__ == "__main__":
    main()
