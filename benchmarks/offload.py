"""Host-RAM offload: compressed weights in pinned host memory, streamed to the GPU ahead of use,
against accelerate's cpu_offload of the bf16 transformers model, same weights, same run. Batch 1.

    python benchmarks/offload.py --model llama-3.1-8b [--prompt 128] [--new 32] [--codec huffman]

h2d_fraction = compressed bytes moved per token x tok/s / measured pinned host-to-device bandwidth
(one 256 MiB copy). Decode tok/s as in decode.py: (N - 1) / (time(N) - time(1)).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, gpu_time_ms, write_result  # noqa: E402
from decode import decode_speed, hf_generator, hf_model_from, ours  # noqa: E402

import codecllm  # noqa: E402
from codecllm.report import format_table, human_bytes  # noqa: E402


def h2d_bandwidth() -> float:
    """Pinned host-to-device copy, bytes per second (256 MiB, median of 6)."""
    a = torch.empty(1 << 28, dtype=torch.uint8).pin_memory()
    b = torch.empty(a.numel(), dtype=torch.uint8, device="cuda")
    return a.numel() / (gpu_time_ms(lambda: b.copy_(a, non_blocking=True), warmup=2, repeat=6) / 1e3)


def accelerate_offload(model, prompt, new):
    """The peer for host-RAM offload: accelerate's cpu_offload of the bf16 transformers model
    (weights in host RAM, each module's copied to the GPU when it runs)."""
    try:
        from accelerate import cpu_offload
    except ImportError as exc:
        return {"error": f"accelerate is not installed ({exc})"}
    hf = hf_model_from(model).to("cpu")
    cpu_offload(hf, execution_device=torch.device("cuda"))
    speed = decode_speed(hf_generator(hf, [prompt]), new, runs=1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.module.parameters())
    return {"tok_s": speed, "h2d_gbps_achieved": weight_bytes * speed / 1e9}


def report(payload: dict) -> str:
    """The offload table and the run's settings, from the payload alone."""
    rows, env = payload["rows"], payload["environment"]
    headers = ["configuration", "tok/s", "bytes moved per token", "GB/s moved", "of pinned H2D", "GPU memory in use"]
    table = format_table(headers,
                         [[label, f"{r['tok_s']:.2f}" if "tok_s" in r else r.get("error", "-"),
                           human_bytes(r["bytes_per_token"]) if "bytes_per_token" in r else "-",
                           f"{r['h2d_gbps_achieved']:.1f}" if "h2d_gbps_achieved" in r else "-",
                           f"{r['h2d_fraction']:.0%}" if "h2d_fraction" in r else "-",
                           human_bytes(r["gpu_memory"]) if "gpu_memory" in r else "-"]
                          for label, r in rows.items()])
    return (f"{table}\n\n{payload['model']}; prompt {payload['prompt']}, {payload['new']} new tokens, batch 1; "
            f"pinned H2D {payload['h2d_bandwidth'] / 1e9:.1f} GB/s; {env['gpu']}; torch {env['torch']}; {env['date']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--codec", default="huffman")
    parser.add_argument("--skip", default="", help="comma-separated: accelerate")
    args = parser.parse_args()
    config = codecllm.models.ModelConfig.from_name(args.model)
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    h2d = h2d_bandwidth()
    rows: dict[str, dict] = {}
    # Eager: a host-side streamer copies ahead on its own stream. CUDA graph: the captured step
    # copies each weight, and auto's side stream copies + decodes the next while one computes.
    for label, graphs in (("eager, streamed ahead", False), ("CUDA graph", True)):
        model, r = ours(args.model, [prompt], args.new, weights=args.codec, cache="auto:0", storage="cpu",
                        cuda_graphs=graphs)
        per_token = r["stats"]["bytes_transferred"] / max(r["stats"]["forward_passes"], 1)
        r.update(bytes_per_token=per_token, h2d_gbps_achieved=per_token * r["tok_s"] / 1e9)
        r["h2d_fraction"] = r["h2d_gbps_achieved"] * 1e9 / h2d
        rows[f"codecllm {args.codec} in host RAM (auto:0), {label}"] = r
        del model
    if "accelerate" not in args.skip.split(","):
        reference, _ = ours(args.model, [prompt], 1, cuda_graphs=False, gemv="cublas")
        r = accelerate_offload(reference, prompt, args.new)
        del reference
        if "h2d_gbps_achieved" in r:
            r["h2d_fraction"] = r["h2d_gbps_achieved"] * 1e9 / h2d
        rows["accelerate cpu_offload (bf16, transformers)"] = r
    for r in rows.values():
        r.pop("tokens", None)
    payload = {"model": args.model, "prompt": args.prompt, "new": args.new, "h2d_bandwidth": h2d, "rows": rows,
               "environment": environment()}
    text = report(payload)
    print(text)
    print(f"wrote {write_result(f'offload-{args.model}', payload, text)}")


if __name__ == "__main__":
    main()
