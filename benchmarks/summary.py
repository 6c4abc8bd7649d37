"""Collect the headline figures of the latest result files into benchmarks/results/summary.json.

    python benchmarks/summary.py [--gpu NVIDIA-H100-80GB-HBM3]

Every figure is copied from a result file written by another script (named in "sources");
nothing here is measured or typed in. `nibble_vs_bf16` is the median of decode.py's rounds that
time the nibble and bf16 graphs in turn (`nibble_vs_bf16_paired` has its range) where a run has
them; `nibble_vs_bf16_rows` divides the two rows, each timed on its own a minute apart, which
moves by several percent between runs; `nibble_vs_bf16_step_replay` is the two captured decode
steps replayed alone in turn (the GPU's time per token, without the host's per-token work).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RATIO_KEYS = ("median", "min", "max", "rounds")  # of decode.py's in-turn ratios (ratio_rounds)
PDL_ROWS = {"bf16": ("codecllm bf16 CUDA graph (Triton GEMV)", "codecllm bf16 CUDA graph (Triton GEMV, no PDL)"),
            "nibble": ("codecllm nibble fused, CUDA graph", "codecllm nibble fused, CUDA graph (no PDL)")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", default="NVIDIA-H100-80GB-HBM3")
    args = parser.parse_args()
    summary: dict = {"roofline_fraction": {}, "nibble_vs_bf16": {}, "nibble_weight_fraction": {},
                     "hf_eager_tok_s": {}, "codecllm_bf16_tok_s": {}, "codecllm_nibble_tok_s": {}, "sources": []}
    for path in sorted(RESULTS.glob(f"decode-*-{args.gpu}.json")):
        data = json.loads(path.read_text())
        rows, model = data["rows"], data["model"]
        best_bf16 = max((r for k, r in rows.items() if k.startswith("codecllm bf16") and "tok_s" in r),
                        key=lambda r: r["tok_s"])
        nibble = max((r for k, r in rows.items() if k.startswith("codecllm nibble fused") and "tok_s" in r),
                     key=lambda r: r["tok_s"], default={})
        batch = data.get("batch", 1)
        # what PDL launches bring: each graph over the same graph captured with plain launches
        pdl_gain = {name: rows[on]["tok_s"] / rows[off]["tok_s"] for name, (on, off) in PDL_ROWS.items()
                    if "tok_s" in rows.get(on, {}) and "tok_s" in rows.get(off, {})}
        summary.setdefault("pdl_speedup", {}).setdefault(model, {})[str(batch)] = pdl_gain or None
        # nibble vs our bf16 graph timed in turn, both loaded (decode.py's paired rounds): median, min, max
        paired = data.get("nibble_vs_bf16_paired")
        paired = {k: paired[k] for k in RATIO_KEYS} if paired else None
        rows_ratio = nibble["tok_s"] / best_bf16["tok_s"] if "tok_s" in nibble else None
        replayed = data.get("nibble_vs_bf16_step_replay")
        replayed = {**{k: replayed[k] for k in RATIO_KEYS}, "bf16_tok_s": replayed["bf16"]["median"],
                    "nibble_tok_s": replayed["nibble"]["median"]} if replayed else None
        if data.get("prompt", 128) != 128:  # decode-MODEL-pP: a long prompt (the goals are for 128)
            summary.setdefault("long_prompt", {}).setdefault(model, {})[str(data["prompt"])] = {
                "batch": batch, "new": data["new"], "codecllm_bf16_tok_s": best_bf16["tok_s"],
                "roofline_fraction": best_bf16["roofline_fraction"], "codecllm_nibble_tok_s": nibble.get("tok_s"),
                "nibble_vs_bf16": paired["median"] if paired else rows_ratio}
            summary["sources"].append(path.name)
            continue
        if batch > 1:  # decode-MODEL-bB: batches of B sequences, tok/s over all of them
            for key, value in (("codecllm_bf16_tok_s_by_batch", best_bf16["tok_s"]),
                               ("codecllm_nibble_tok_s_by_batch", nibble.get("tok_s")),
                               ("nibble_vs_bf16_by_batch", paired["median"] if paired else rows_ratio),
                               ("nibble_vs_bf16_rows_by_batch", rows_ratio),
                               ("nibble_vs_bf16_paired_by_batch", paired),
                               ("nibble_vs_bf16_step_replay_by_batch", replayed)):
                summary.setdefault(key, {}).setdefault(model, {})[str(batch)] = value
            summary["sources"].append(path.name)
            continue
        summary["roofline_fraction"][model] = best_bf16["roofline_fraction"]
        summary["codecllm_bf16_tok_s"][model] = best_bf16["tok_s"]
        summary["hf_eager_tok_s"][model] = rows.get("HF transformers eager", {}).get("tok_s")
        earlier = RESULTS / f"hf-{path.name}"  # a run with the HF rows, kept when a later run skipped them
        if summary["hf_eager_tok_s"][model] is None and earlier.exists():
            summary["hf_eager_tok_s"][model] = json.loads(earlier.read_text())["rows"]["HF transformers eager"]["tok_s"]
            summary["sources"].append(earlier.name)
        huffman_rows = rows
        apart = RESULTS / f"huffman-{path.name}"  # the huffman rows of a run of their own (8B: long encode)
        if not any("huffman" in k for k in rows) and apart.exists():
            huffman_rows = json.loads(apart.read_text())["rows"]
            summary["sources"].append(apart.name)
        for label, r in huffman_rows.items():
            if label.startswith("codecllm huffman") and "tok_s" in r:
                kept = label.removeprefix("codecllm huffman ").replace(" kept", "")  # 'auto 10%', 'none, CUDA graph'
                summary.setdefault("codecllm_huffman_tok_s", {}).setdefault(model, {})[kept] = r["tok_s"]
        if "tok_s" in nibble:
            summary["codecllm_nibble_tok_s"][model] = nibble["tok_s"]
            summary["nibble_vs_bf16"][model] = paired["median"] if paired else rows_ratio
            summary.setdefault("nibble_vs_bf16_rows", {})[model] = rows_ratio
            summary.setdefault("nibble_vs_bf16_paired", {})[model] = paired
            summary.setdefault("nibble_vs_bf16_step_replay", {})[model] = replayed
            summary["nibble_weight_fraction"][model] = nibble["weights_held"] / nibble["weights_original"]
        summary.update(gpu=data["environment"]["gpu"], date=data["environment"]["date"],
                       torch=data["environment"]["torch"])
        summary["sources"].append(path.name)
    for path in sorted(RESULTS.glob(f"offload-*-{args.gpu}.json")):
        data = json.loads(path.read_text())
        for label, r in data["rows"].items():
            if "tok_s" not in r:
                continue
            if label.startswith("codecllm"):  # the best of our rows
                if r["tok_s"] > summary.get("offload_tok_s", {}).get(data["model"], 0):
                    summary.setdefault("offload_h2d_fraction", {})[data["model"]] = r["h2d_fraction"]
                    summary.setdefault("offload_tok_s", {})[data["model"]] = r["tok_s"]
            else:
                summary.setdefault("accelerate_cpu_offload_tok_s", {})[data["model"]] = r["tok_s"]
        summary["sources"].append(path.name)
    codecs = RESULTS / f"codecs-{args.gpu}.json"
    if codecs.exists():
        rows = {r["codec"]: r for r in json.loads(codecs.read_text())["rows"]}
        summary["huffman_decode_gbps"] = rows["codecllm huffman"].get("gpu_decode_gbps")
        summary["dfloat11_decode_gbps"] = rows.get("DFloat11 0.5.0", {}).get("gpu_decode_gbps")
        # one call from Python, host launch latency included (codecs.py's "one call" column)
        summary["huffman_decode_call_gbps"] = rows["codecllm huffman"].get("gpu_call_gbps")
        summary["dfloat11_decode_call_gbps"] = rows.get("DFloat11 0.5.0", {}).get("gpu_call_gbps")
        summary["sources"].append(codecs.name)
    for path in sorted(RESULTS.glob(f"dfloat11_model-*-{args.gpu}.json")):
        data = json.loads(path.read_text())
        for label, r in data["rows"].items():
            key = {"DFloat11Model (HF eager + DFloat11 0.5.0)": "dfloat11_model_tok_s",
                   "codecllm huffman auto 0% kept, CUDA graph": "codecllm_huffman_auto0_tok_s"}.get(label)
            if key:
                summary.setdefault(key, {})[data["model"]] = r["tok_s"]
        summary["sources"].append(path.name)
    out = RESULTS / "summary.json"
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
