"""GemvLinear: nn.Linear whose single-row calls inside a CUDA-graph decode step run our Triton
GEMV instead of cuBLAS.

The uncompressed baseline must be the best GEMV we can measure, not just cuBLAS: at batch 1 our
Triton kernel beats cuBLAS on every decode shape of the benchmarks (benchmarks/gemv.py), at
batches 2-8 it does not, and outside a captured graph its host-side launch costs more than
cuBLAS's. So it is used for one row, inside `graph_step()`, and cuBLAS everywhere else.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.codecs.kernels_available import fused_gemv_possible

_in_graph_step = contextvars.ContextVar("codecllm_graph_step", default=False)


@contextlib.contextmanager
def graph_step():
    """Marks the forward passes that a CUDA graph captures (and their warm-up runs)."""
    token = _in_graph_step.set(True)
    try:
        yield
    finally:
        _in_graph_step.reset(token)


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_graph_step.get() and x.numel() == x.shape[-1] and fused_gemv_possible(x.device):
            from codecllm.codecs.kernels.gemv import gemv

            y = gemv(x, self.weight)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


def use_triton_gemv(model: nn.Module) -> int:
    """Turn every plain nn.Linear of `model` into a GemvLinear, in place (same parameters)."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = GemvLinear
            count += 1
    return count
