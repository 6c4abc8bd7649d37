"""Where a decode step's GPU time goes: every kernel of one step, grouped by name, with launches
and microseconds per step (torch.profiler). Eager steps by default; --graphs profiles replays of
the captured decode step (the path `codecllm bench` times), whose kernels differ (static KV
slot, Triton GEMVs). Kernel time excludes the gaps between kernels; wall time per step is
printed beside it. With programmatic dependent launch (sm_90 and later, on by default) a kernel
starts while the one before runs and its span includes that wait, so spans overlap and their sum
can exceed the wall time: CODECLLM_PDL=0 profiles plain launches, one kernel after another.

    python benchmarks/step_profile.py --model tinyllama-1.1b [--weights nibble --cache fused] [--graphs]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result
from decode import decode_speed

from codecllm.codecs.kernels import pdl

import codecllm
from codecllm.report import format_table


def report(payload: dict) -> str:
    """The per-kernel table (top 25) and the step's totals, from the payload alone."""
    rows, total_us = payload["rows"], payload["kernel_us_per_step"]
    table = format_table(["kernel", "launches/step", "us/step", "share"],
                         [[name[:80], f"{n:.0f}", f"{us:.1f}", f"{us / total_us:.0%}"] for name, n, us in rows[:25]])
    mode = "graph" if payload["graphs"] else "eager"
    if payload["pdl"]:
        mode += ", PDL: kernel spans overlap"
    env = payload["environment"]
    return (f"{table}\n\n{payload['model']} {payload['weights']} ({payload['cache']}, {mode}): "
            f"{payload['kernels_per_step']:.0f} kernels, {total_us:.0f} us of kernel time per decode step, "
            f"{payload['wall_us_per_step']:.0f} us wall; {env['gpu']}; torch {env['torch']}; {env['date']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinyllama-1.1b")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--cache", default="auto")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--graphs", action="store_true", help="profile CUDA-graph replays of the decode step")
    args = parser.parse_args()
    model = codecllm.load(args.model, device="cuda", weights=args.weights, cache=args.cache,
                          cuda_graphs=args.graphs)
    prompt = list(range(1, 129))
    # wall time of a step as decode.py measures it, (time(N) - time(1)) / (N - 1), over 64 steps (a
    # few leave it to the noise of the calls' fixed costs; 128 + 65 tokens stay in the first
    # 256-token graph bucket, as the profiled steps do), before any profiling
    wall_us = 1e6 / decode_speed(lambda n: model.generate(prompt, n), 65)
    model.generate(prompt, args.steps + 1)  # warm-up
    model.generate(prompt, 1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(prompt, args.steps + 1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prefill_only:
        model.generate(prompt, 1)
    torch.cuda.synchronize()

    def kernels(p):
        totals = defaultdict(lambda: [0, 0.0])
        for event in p.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name][0] += 1
                totals[event.name][1] += event.device_time
        return totals

    full, first = kernels(prof), kernels(prefill_only)
    rows = []
    for name, (count, us) in full.items():
        count0, us0 = first.get(name, (0, 0.0))
        per_step = ((count - count0) / args.steps, (us - us0) / args.steps)
        if per_step[0] > 0:
            rows.append((name, *per_step))
    rows.sort(key=lambda r: -r[2])
    total_us = sum(r[2] for r in rows)
    total_launches = sum(r[1] for r in rows)
    label = f"step_profile-{args.model}-{args.weights or 'bf16'}" + ("-graph" if args.graphs else "")
    payload = {"model": args.model, "weights": args.weights or "bf16", "cache": args.cache, "rows": rows,
               "kernels_per_step": total_launches, "kernel_us_per_step": total_us, "wall_us_per_step": wall_us,
               "graphs": args.graphs, "pdl": pdl.enabled(torch.device("cuda")), "environment": environment()}
    text = report(payload)
    print(text)
    print(f"wrote {write_result(label, payload, text)}")


if __name__ == "__main__":
    main()
