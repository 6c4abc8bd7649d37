"""When the decode step's elementwise ops run as fused Triton kernels (`fused_kernels.py`).

In eager PyTorch RMSNorm, residual add + RMSNorm, RoPE and SiLU(gate) * up are 4-10 small
kernels each; a batch-1 decode step is bound by their count (a few microseconds each), not by
their bytes, so on bf16 CUDA tensors each runs as one Triton kernel. The PyTorch code in
`layers.py` stays the reference and runs everywhere else. CODECLLM_FUSED=0 turns them off.
This module does not import Triton (an optional dependency); the kernels' module does.
"""

from __future__ import annotations

import os

import torch

from codecllm.codecs import triton_available


def switched_on() -> bool:
    """False when CODECLLM_FUSED=0 asks for the PyTorch ops."""
    return os.environ.get("CODECLLM_FUSED", "1") != "0"


def enabled(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and switched_on() and triton_available()
