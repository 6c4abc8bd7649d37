"""GemvLinear: nn.Linear whose calls of 1-8 rows inside a CUDA-graph decode step run our Triton
GEMV instead of cuBLAS; `fused_projections`: several linears over one input in one launch.

The uncompressed baseline must be the best GEMV we can measure, not just cuBLAS. Inside a
captured decode step our Triton GEMVs (one launch for q/k/v, one for gate/up with SiLU) beat
cuBLAS's separate calls end to end at every batch measured (benchmarks/decode.py, H100: batches
1, 4 and 8; at 4 and 8 tinyllama 1.23-1.25x, 8B 1.12-1.13x), though cuBLAS wins on a few shapes
alone at batch 8 (benchmarks/gemv.py). Outside a captured graph the Triton launch's host cost is more than
cuBLAS's, so cuBLAS runs everywhere else.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.codecs.kernels_available import fused_gemv_possible, gemv_rows_fit
from codecllm.models import fused

_in_graph_step = contextvars.ContextVar("codecllm_graph_step", default=False)


@contextlib.contextmanager
def graph_step():
    """Marks the forward passes that a CUDA graph captures (and their warm-up runs)."""
    token = _in_graph_step.set(True)
    try:
        yield
    finally:
        _in_graph_step.reset(token)


def _triton_gemv_applies(x: torch.Tensor) -> bool:
    """Whether an uncompressed linear takes our Triton GEMV for x: 1-8 rows, in a graph step."""
    return _in_graph_step.get() and gemv_rows_fit(x) and fused_gemv_possible(x.device)


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _triton_gemv_applies(x):
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


def fused_projections(x: torch.Tensor, linears, gated: bool = False) -> torch.Tensor | None:
    """The outputs of 2-3 bias-free linears over the same input (q/k/v), side by side along the
    last dimension, from one GEMV launch; with gated=True (gate, up) silu(gate(x)) * up(x).
    None where the single-launch kernel does not apply (the caller then runs each linear):
    it applies where each linear alone would take a Triton GEMV, i.e. uncompressed linears
    inside a graph step, or nibble weights under the `fused` policy, at <= 8 rows.
    A batch-1 decode step of a small model is bound by its kernel count, which this cuts."""
    from codecllm.weights.modules import CompressedLinear

    first = linears[0]
    if any(type(linear) is not type(first) or linear.bias is not None for linear in linears):
        return None
    if gated and (x.dtype != torch.bfloat16 or not fused.switched_on()):
        return None
    if type(first) is GemvLinear:
        if not _triton_gemv_applies(x):
            return None
        weights = [linear.weight for linear in linears]
    elif type(first) is CompressedLinear:
        weights = [linear._fused_gemv_for(x) for linear in linears]
        if any(w is None for w in weights):
            return None
        for linear in linears:
            linear.cache.count_fused()
    else:
        return None
    from codecllm.codecs.kernels.gemv import gemv_group

    return gemv_group(x, weights, gated=gated)
