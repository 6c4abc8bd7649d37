"""Building blocks shared by the model families: norms, rotary embeddings, attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.models import fused
from codecllm.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x) and self.weight.dtype == x.dtype:
            from codecllm.models.fused_kernels import rms_norm

            return rms_norm(x, self.weight, self.eps)
        # Normalise in fp32, as the reference implementations do, then cast back.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)): a residual add and the norm after it, one kernel on the GPU."""
        if fused.enabled(x) and self.weight.dtype == x.dtype and delta.dtype == x.dtype:
            from codecllm.models.fused_kernels import add_rms_norm

            return add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies, with Llama 3's long-context rescaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for `positions` (batch, seq): each (batch, 1, seq, head_dim)."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)[None, None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by the half-split convention of HF Llama."""
    if fused.enabled(x) and cos.dtype == x.dtype:
        from codecllm.models.fused_kernels import rope

        return rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D); mask: bool (B, 1, T, S), True = may attend.
    """
    # enable_gqa lets each group of query heads read its KV head in place (no repeated copy).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def causal_mask(padding: torch.Tensor | None, query_positions: int, total: int, device) -> torch.Tensor:
    """Bool (B, 1, T, S): query t (the last T of S positions) sees keys <= its own position and
    no padded key. `padding`: bool (B, S), True where a real token is."""
    rows = torch.arange(total - query_positions, total, device=device)[:, None]
    cols = torch.arange(total, device=device)[None, :]
    mask = (cols <= rows)[None, None]
    if padding is not None:
        mask = mask & padding[:, None, None, :total]
    return mask
