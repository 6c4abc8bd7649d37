"""Whether a Triton kernel can run for tensors on a device (CUDA, or the CPU interpreter)."""

from __future__ import annotations

import functools
import os

import torch

from codecllm.codecs import triton_available


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (which gets bf16 arithmetic wrong, so
    kernels widen to fp32 first there)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


GEMV_MAX_ROWS = 8  # the Triton GEMVs take inputs of at most this many rows (decode steps of batches 1-8)


def gemv_rows_fit(x: torch.Tensor) -> bool:
    return x.numel() <= GEMV_MAX_ROWS * x.shape[-1]


def fused_gemv_possible(device: torch.device) -> bool:
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def hopper_or_later(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later (PDL launches, TMA copies)."""
    return device.type == "cuda" and _hopper_or_later(_index(device))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (an H100's 132 for the CPU interpreter)."""
    if device.type != "cuda":
        return 132
    return _sm_count(_index(device))
