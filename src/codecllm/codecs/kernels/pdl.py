"""Programmatic dependent launch (PDL) for the decode step's kernels, on Hopper GPUs and later.

A decode step is a chain of short kernels (tinyllama: eight a layer, about 180 a step), and each
normally starts only after the one before has ended: the GPU sits idle while the next kernel is
launched and its programs are placed. Launched with PDL, a kernel may start while the one before
still runs: its programs wait on the GPU (`wait_for_inputs`, griddepcontrol.wait) until that
kernel has ended and its writes are visible, and read and write nothing before. Each kernel says
when the next may launch (`launch_next`): the step's kernels do so right after their wait (so at
most one kernel waits ahead of the one running), except the gate/up GEMV and the large nibble
GEMVs on tensor cores, which do so after their loops (see gemv.py).

Results are unchanged (the same kernels in the same order; the GPU tests compare bits and
tokens). On an H100 tinyllama's decode steps run 1-11% faster at batches 1-8, the 8B's (long
GEMVs) 2% at batch 1 (benchmarks/decode.py, NOTES.md). CODECLLM_PDL=0 launches the plain way.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from codecllm.codecs.kernels_available import interpreting

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: plain launches
    gdc_launch_dependents = gdc_wait = None


def switched_on() -> bool:
    return os.environ.get("CODECLLM_PDL", "1") != "0"


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA GPU of compute capability 9.0 or
    later, a Triton that has it, not the CPU interpreter, and CODECLLM_PDL not 0."""
    return (device.type == "cuda" and gdc_wait is not None and not interpreting() and switched_on()
            and _capable(device.index if device.index is not None else torch.cuda.current_device()))


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for launching a kernel that takes a PDL constexpr."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Everything the kernel before wrote is visible after this. Call it before any read of data
    a kernel writes and before any write."""
    if PDL:
        gdc_wait()


@triton.jit
def launch_next(PDL: tl.constexpr):
    """The next kernel may launch once every program of this one has called this (or ended)."""
    if PDL:
        gdc_launch_dependents()
