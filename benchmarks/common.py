"""Shared by the benchmark scripts: environment facts, GPU timing, JSON results."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from codecllm.report import environment as environment  # re-exported: the scripts take it from here

RESULTS = Path(__file__).parent / "results"


def gpu_time_ms(fn: Callable[[], Any], warmup: int = 3, repeat: int = 20, calls: int = 1) -> float:
    """Median milliseconds per call of `fn` on the GPU, timed with CUDA events after warm-up.

    With calls=1 the events bracket one call, so the time includes any launch latency the host
    adds while the GPU waits. With calls > 1 they bracket that many calls enqueued back to back:
    the host's launch work overlaps the GPU's, and the figure is device time per call (as long
    as the GPU is the slower side)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def rotating(items):
    """A function that returns the next of `items` at each call, cycling: timing code calls it to
    touch a different copy of the data each time, so the 50 MB L2 never holds what is timed."""
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def graph_time_ms(fn: Callable[[], Any], calls: int = 20, repeat: int = 20) -> float:
    """Median milliseconds per call of `fn`, replayed from a CUDA graph of `calls` calls, so host
    launch overhead is out of the figure (what a graph-captured decode step sees)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def cpu_time_s(fn: Callable[[], Any], repeat: int = 1) -> float:
    """Median wall-clock seconds of `fn` on the CPU."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_result(name: str, payload: dict[str, Any], report: str) -> Path:
    """benchmarks/results/NAME-GPU.json, and NAME-GPU.txt with `report` (the tables the script
    printed, rendered from this payload) under the command line that made it, so the two always
    come from one run. The payload holds its `environment()`, which the reports print too."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = payload["environment"]
    tag = (env.get("gpu") or "cpu").replace(" ", "-").replace("/", "-")
    path = RESULTS / f"{name}-{tag}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    command = " ".join(["python", *sys.argv])
    path.with_suffix(".txt").write_text(f"{command}   ({env.get('date')})\n\n{report}\n")
    return path
