"""The `codecllm` command. User mistakes print one line and exit 1; bugs keep their traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from codecllm import checkpoint
from codecllm.codecs import CODECS, decode, encode, gpu_available
from codecllm.errors import CodecllmError, ConfigError
from codecllm.models.config import NAMED_CONFIGS
from codecllm.report import format_table, human_bytes


@contextlib.contextmanager
def model_directory(path_or_config: str, seed: int = 0) -> Iterator[Path]:
    """A HF-layout directory: the given one, or a named config written with random weights."""
    path = Path(path_or_config)
    if path.exists():
        yield path
        return
    if path_or_config not in NAMED_CONFIGS:
        raise ConfigError(
            f"{path_or_config!r} is neither a directory nor a named config; "
            f"named configs: {', '.join(NAMED_CONFIGS)}"
        )
    from codecllm.models import write_random_model

    with tempfile.TemporaryDirectory(prefix="codecllm-") as tmp:
        print(f"building {path_or_config} with random weights (seed {seed})...", file=sys.stderr)
        yield write_random_model(path_or_config, Path(tmp) / path_or_config, seed=seed)


# ---- commands ----------------------------------------------------------------------------------


def cmd_compress(args: argparse.Namespace) -> int:
    checkpoint.check_compress_options(args.out, args.codec, args.layers, args.overwrite)  # before building a model
    with model_directory(args.model) as model_dir:
        start = time.perf_counter()
        summary = checkpoint.compress_checkpoint(model_dir, args.out, codec=args.codec, layers=args.layers,
                                                 overwrite=args.overwrite)
        seconds = time.perf_counter() - start
    print(f"wrote {summary.out_dir}: {summary.compressed}/{summary.tensors} tensors compressed with "
          f"{args.codec}, {human_bytes(summary.original_bytes)} -> {human_bytes(summary.stored_bytes)} "
          f"({summary.ratio:.2%}) in {seconds:.1f} s")
    for reason, count in summary.kept_uncompressed.items():
        print(f"note: {count} {reason}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    rows, totals = checkpoint.inspect_rows(args.checkpoint)
    print(inspect_table(rows, totals, limit=None if args.all else 40))
    return 0


def inspect_table(rows, totals, limit: int | None = 40) -> str:
    shown = rows if limit is None or len(rows) <= limit else rows[:limit]
    table = format_table(
        ["tensor", "codec", "dtype", "shape", "original", "stored", "ratio"],
        [[r["name"], r["codec"], r["dtype"], r["shape"], human_bytes(r["original_bytes"]),
          human_bytes(r["stored_bytes"]), f"{r['ratio']:.2%}"] for r in shown],
        align="lllllrr",
    )
    lines = [table]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more tensors (--all shows every one)")
    lines.append(f"total: {totals['tensors']} tensors, {totals['compressed']} compressed "
                 f"({totals['codec']}): {human_bytes(totals['original_bytes'])} -> "
                 f"{human_bytes(totals['stored_bytes'])} ({totals['ratio']:.2%})")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    result = checkpoint.verify_checkpoint(args.checkpoint, device=args.device)
    for failure in result.failures:
        print(f"FAIL {failure}")
    if result.ok:
        print(f"ok: {result.tensors} tensors, {human_bytes(result.bytes_checked)} decoded, every checksum matches")
        return 0
    print(f"{len(result.failures)} of {result.tensors} tensors failed verification", file=sys.stderr)
    return 1


def cmd_compare(args: argparse.Namespace) -> int:
    """Compress a model with every codec; print the inspect table and a codec comparison."""
    codecs = args.codecs.split(",") if args.codecs else list(CODECS)
    device = "cuda" if gpu_available() else None
    results = []
    with model_directory(args.model) as model_dir, tempfile.TemporaryDirectory() as tmp:
        weights = {name: t for name, _, t in checkpoint.iter_safetensors(checkpoint.safetensors_files(model_dir))
                   if checkpoint.wants_compression(name, t, None)}
        original = sum(t.numel() * t.element_size() for t in weights.values())
        for codec in codecs:
            out = Path(tmp) / codec
            summary = checkpoint.compress_checkpoint(model_dir, out, codec=codec, show_progress=False)
            encoded = {}
            start = time.perf_counter()
            for name, t in weights.items():
                if t.dtype in CODECS[codec].dtypes:
                    encoded[name] = encode(t, codec)
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            for e in encoded.values():
                decode(e, "cpu")
            decode_s = time.perf_counter() - start
            gpu_gbps = measure_gpu_decode(encoded) if device and CODECS[codec].has_gpu_decoder else None
            stored = sum(e.nbytes for e in encoded.values())
            results.append({"codec": codec, "weights_bytes": original, "stored_bytes": stored,
                            "ratio": stored / original, "checkpoint_ratio": summary.ratio,
                            "encode_weights_per_s": sum(e.numel for e in encoded.values()) / encode_s,
                            "cpu_decode_gbps": original / decode_s / 1e9, "gpu_decode_gbps": gpu_gbps})
            if codec == codecs[0]:
                rows, totals = checkpoint.inspect_rows(out)
                print(f"\n## `codecllm inspect` of {args.model} compressed with {codec}\n")
                print(inspect_table(rows, totals, limit=12))
    print(f"\n## Codec comparison on the 2-D weights of {args.model} ({human_bytes(original)})\n")
    print(format_table(
        ["codec", "size", "encode (CPU)", "decode (CPU)", "decode (GPU)"],
        [[r["codec"], f"{r['ratio']:.2%}", f"{r['encode_weights_per_s'] / 1e6:.1f} M weights/s",
          f"{r['cpu_decode_gbps']:.2f} GB/s",
          f"{r['gpu_decode_gbps']:.0f} GB/s" if r["gpu_decode_gbps"] else "no GPU"] for r in results],
    ))
    print(f"\nsizes include every byte needed to decode; decode speeds are GB/s of decoded output "
          f"({torch.get_num_threads()} CPU threads)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "results": results}, indent=2))
    return 0


def measure_gpu_decode(encoded: dict) -> float:
    """GB/s of decoded output over all tensors, on the GPU, after a warm-up (CUDA events)."""
    on_gpu = [e.to("cuda") for e in encoded.values()]
    for e in on_gpu:
        decode(e, verify=False)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for e in on_gpu:
        decode(e, verify=False)
    end.record()
    torch.cuda.synchronize()
    return sum(e.original_nbytes for e in on_gpu) / (start.elapsed_time(end) / 1e3) / 1e9


# ---- argument parsing ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codecllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress a Hugging Face-layout model directory")
    p.add_argument("model", help="model directory (config.json + *.safetensors) or a named config")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--codec", default="huffman", choices=list(CODECS))
    p.add_argument("--layers", help="only these: block ranges like 0-3 and name globs, comma-separated")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("inspect", help="per-tensor and total sizes of a compressed checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="decode every tensor and check every checksum")
    p.add_argument("checkpoint")
    p.add_argument("--device", default=None, help="decode on this device (default: cpu)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("compare", help="compress a model with every codec and compare them")
    p.add_argument("model", nargs="?", default="tiny", help="model directory or named config (default: tiny)")
    p.add_argument("--codecs", help=f"comma-separated subset of: {', '.join(CODECS)}")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_compare)

    from codecllm.cli_engine import register

    register(sub)
    return parser




def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "bench" and args.model is None:  # (bench kv picks its own)
        args.model = "tinyllama-1.1b" if torch.cuda.is_available() else "tiny"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CodecllmError as exc:
        print(f"codecllm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("codecllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
