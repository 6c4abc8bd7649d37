"""GemvLinear: nn.Linear whose decode-step calls (at most 8 rows) run our Triton GEMV.

The uncompressed baseline must be the best GEMV we can measure, not just cuBLAS: at batch 1 a
plain Triton kernel of the same structure as the fused nibble one can beat cuBLAS (DESIGN.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.codecs.kernels_available import fused_gemv_possible


class GemvLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= 8 and fused_gemv_possible(x.device):
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
