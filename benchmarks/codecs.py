"""Codec benchmark: size, CPU encode/decode speed and GPU decode throughput, ours and the peers,
on the same N(0, 0.02) bf16 weights in the same run.

    python benchmarks/codecs.py [--numel 33554432] [--skip-cpu-decode]

Peers (each measured if importable, else reported as unavailable): DFloat11 0.5.0 (GPU decoder,
pure-Python encoder), nvCOMP ANS (GPU), ZipNN (CPU), zstd (CPU, python-zstandard level 3).
GPU decode is timed with CUDA events (median of 20 after warm-up), rotating over 4 copies of the
encoded data so the 50 MB L2 cache does not flatter; throughput is GB/s of decoded output, two
ways: "decode (GPU)" is device time, CALLS calls enqueued back to back between the events (the
host's launch work hidden behind the GPU's, what a decoder inside a CUDA graph or a busy stream
sees); "one call" brackets a single call, so it includes the host's launch latency (Python
wrapper, allocation, kernel launch) while the GPU waits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import codecllm  # noqa: E402
from codecllm.codecs import CODECS, gpu_available  # noqa: E402
from codecllm.report import format_table  # noqa: E402
from common import cpu_time_s, environment, gpu_time_ms, rotating, write_result  # noqa: E402

COPIES = 4
CALLS = 10  # calls between the events for the device-time figure


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.reshape(-1).view(torch.int16).cpu(), b.reshape(-1).view(torch.int16).cpu())


def gpu_rates(run, nbytes: int) -> dict:
    """GB/s of decoded output: device time per call, and one call with its launch latency."""
    device_ms = gpu_time_ms(run, calls=CALLS)
    call_ms = gpu_time_ms(run)
    return {"gpu_decode_gbps": nbytes / (device_ms / 1e3) / 1e9, "gpu_call_gbps": nbytes / (call_ms / 1e3) / 1e9}


def ours(weights: torch.Tensor, skip_cpu_decode: bool) -> list[dict]:
    rows = []
    for name in CODECS:
        encode_s = cpu_time_s(lambda n=name: codecllm.encode(weights, n), repeat=3)
        encoded = codecllm.encode(weights, name)
        row = {"codec": f"codecllm {name}", "size": encoded.ratio,
               "encode_mweights_s": weights.numel() / encode_s / 1e6}
        if not skip_cpu_decode:
            decode_s = cpu_time_s(lambda e=encoded: codecllm.decode(e), repeat=3)
            row["cpu_decode_gbps"] = encoded.original_nbytes / decode_s / 1e9
        if gpu_available() and CODECS[name].has_gpu_decoder:
            copies = [encoded.to("cuda") for _ in range(COPIES)]
            assert bits_equal(codecllm.decode(copies[0]), weights), f"{name}: GPU decode not bit-identical"
            pick = rotating(copies)
            row.update(gpu_rates(lambda pick=pick: codecllm.decode(pick(), verify=False), encoded.original_nbytes))
            row["bit_identical"] = True
        rows.append(row)
    return rows


def dfloat11(weights: torch.Tensor) -> dict:
    row: dict = {"codec": "DFloat11 0.5.0"}
    try:
        import math

        from dfloat11 import dfloat11 as df
        from dfloat11.dfloat11_utils import encode_weights, get_32bit_codec, get_codec, get_luts
    except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
        return {**row, "error": f"unavailable: {exc}"}
    import contextlib
    import io

    flat = weights.reshape(-1).cpu()
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        import time

        start = time.perf_counter()
        _, counter = get_codec(flat)
        codec, _, table = get_32bit_codec(counter)
        luts = get_luts(table)
        encoded, other, positions, gaps, _ = encode_weights([flat], codec, df.bytes_per_thread,
                                                            df.threads_per_block[0])
        encode_s = time.perf_counter() - start
    size = (encoded.numel() + other.numel() + positions.numel() * 4 + gaps.numel() + luts.numel())
    row.update(size=size / (flat.numel() * 2), encode_mweights_s=flat.numel() / encode_s / 1e6)
    if not torch.cuda.is_available():
        return row
    import cupy as cp

    threads = df.threads_per_block[0]
    positions_np = positions.view(torch.int32).numpy().astype("int64")
    shared = threads * 4 + 4 + int((positions_np[1:] - positions_np[:-1]).max()) * 2
    blocks = (int(math.ceil(encoded.numel() / (threads * df.bytes_per_thread))),)
    copies = []
    for _ in range(COPIES):
        copies.append([t.cuda() for t in (luts, encoded, other, positions.view(torch.uint8), gaps)]
                      + [torch.empty(flat.numel(), dtype=torch.bfloat16, device="cuda")])
    pick = rotating(copies)

    def run():
        lut, enc, oth, pos, gap, out = pick()
        df._decode(grid=blocks, block=(threads,), shared_mem=shared,
                   args=[lut.data_ptr(), enc.data_ptr(), oth.data_ptr(), pos.data_ptr(), gap.data_ptr(),
                         out.data_ptr(), lut.shape[0], enc.numel(), flat.numel()],
                   stream=cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream))
        return out

    out = run()
    torch.cuda.synchronize()
    row["bit_identical"] = bits_equal(out, flat)
    row.update(gpu_rates(run, flat.numel() * 2))
    return row


def nvcomp_ans(weights: torch.Tensor) -> dict:
    row: dict = {"codec": "nvCOMP ANS"}
    try:
        from nvidia import nvcomp
    except Exception as exc:  # noqa: BLE001
        return {**row, "error": f"unavailable: {exc}"}
    if not torch.cuda.is_available():
        return {**row, "error": "needs a GPU"}
    try:
        data = weights.reshape(-1).cuda().view(torch.uint8)
        codec = nvcomp.Codec(algorithm="ANS")
        compressed = [codec.encode(nvcomp.as_array(data)) for _ in range(COPIES)]
        torch.cuda.synchronize()
        size = compressed[0].buffer_size / data.numel()
        restored = torch.as_tensor(codec.decode(compressed[0]), device="cuda")
        pick = rotating(compressed)

        def run():
            codec.decode(pick())

        return {**row, "size": size, **gpu_rates(run, data.numel()),
                "bit_identical": torch.equal(restored.view(torch.uint8).reshape(-1), data)}
    except Exception as exc:  # noqa: BLE001
        return {**row, "error": f"failed: {type(exc).__name__}: {exc}"}


def zipnn(weights: torch.Tensor) -> dict:
    row: dict = {"codec": "ZipNN"}
    try:
        from zipnn import ZipNN
    except Exception as exc:  # noqa: BLE001
        return {**row, "error": f"unavailable: {exc}"}
    data = weights.reshape(-1).view(torch.uint8).numpy().tobytes()
    z = ZipNN(input_format="byte", bytearray_dtype="bfloat16")
    # ZipNN 0.5 rearranges its input buffer in place: give every call its own copy.
    compressed = z.compress(bytes(bytearray(data)))
    encode_s = cpu_time_s(lambda: z.compress(bytes(bytearray(data))), repeat=3)
    decode_s = cpu_time_s(lambda: z.decompress(bytes(compressed)), repeat=3)
    restored = z.decompress(bytes(compressed))
    return {**row, "size": len(compressed) / len(data), "encode_mweights_s": weights.numel() / encode_s / 1e6,
            "cpu_decode_gbps": len(data) / decode_s / 1e9, "bit_identical": bytes(restored) == data}


def zstd_plain(weights: torch.Tensor) -> dict:
    import zstandard

    data = weights.reshape(-1).view(torch.uint8).numpy().tobytes()
    compressed = zstandard.ZstdCompressor(level=3).compress(data)
    encode_s = cpu_time_s(lambda: zstandard.ZstdCompressor(level=3).compress(data), repeat=3)
    decode_s = cpu_time_s(lambda: zstandard.ZstdDecompressor().decompress(compressed), repeat=3)
    return {"codec": "zstd -3 (one thread, whole buffer)", "size": len(compressed) / len(data),
            "encode_mweights_s": weights.numel() / encode_s / 1e6, "cpu_decode_gbps": len(data) / decode_s / 1e9,
            "bit_identical": zstandard.ZstdDecompressor().decompress(compressed) == data}


def report(payload: dict) -> str:
    """The codecs table and the run's settings, from the payload alone."""
    rows, env = payload["rows"], payload["environment"]

    def cell(row, key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else "-"

    table = format_table(
        ["codec", "size", "encode (CPU)", "decode (CPU)", "decode (GPU)", "one call (GPU)", "exact"],
        [[r["codec"], cell(r, "size", "{:.2%}"), cell(r, "encode_mweights_s", "{:.1f} M/s"),
          cell(r, "cpu_decode_gbps", "{:.2f} GB/s"), cell(r, "gpu_decode_gbps", "{:.0f} GB/s"),
          cell(r, "gpu_call_gbps", "{:.0f} GB/s"),
          {True: "yes", False: "NO"}.get(r.get("bit_identical"), r.get("error", "-"))] for r in rows],
    )
    return (f"{table}\n\n{payload['numel'] / 1e6:.1f}M bf16 weights N(0, 0.02); {env['gpu'] or 'no GPU'}; "
            f"torch {env['torch']}; triton {env['triton']}; {env['cpu_threads']} CPU threads; {env['date']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--skip-cpu-decode", action="store_true")
    parser.add_argument("--peers", default="dfloat11,nvcomp,zipnn,zstd")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    weights = (torch.randn(args.numel, generator=g) * 0.02).bfloat16()
    rows = ours(weights, args.skip_cpu_decode)
    peers = {"dfloat11": dfloat11, "nvcomp": nvcomp_ans, "zipnn": zipnn, "zstd": zstd_plain}
    for name in args.peers.split(","):
        if name:
            rows.append(peers[name](weights))
    payload = {"numel": args.numel, "rows": rows, "environment": environment()}
    text = report(payload)
    print(text)
    print(f"wrote {write_result('codecs', payload, text)}")


if __name__ == "__main__":
    main()
