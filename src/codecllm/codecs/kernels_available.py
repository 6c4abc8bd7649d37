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


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (an H100's 132 for the CPU interpreter)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
