"""QuantizedKVCache: keys and values stored as int8 or int4 with per-group scales.

Each (token, head) vector of head_dim values is cut into groups of `group` values; a group keeps
one fp16 scale (max |x| / qmax, symmetric) and its integers. int4 packs two values per byte.
Memory per value: int8 1 + 2/group bytes, int4 0.5 + 2/group bytes (bf16: 2), so with group 64
the cache takes 0.52x (int8) and 0.27x (int4) of bf16. `update` quantizes the new tokens in place
and returns the dequantized keys and values for attention (a transient, not stored).
"""

from __future__ import annotations

import torch

from codecllm.errors import CacheError
from codecllm.kv.cache import CacheBase
from codecllm.models.config import ModelConfig


class QuantizedKVCache(CacheBase):
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, bits: int = 8,
                 group: int = 64, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        if bits not in (4, 8):
            raise CacheError(f"quantized KV cache bits must be 4 or 8, got {bits}")
        group = min(group, head_dim)
        if head_dim % group or (bits == 4 and group % 2):
            raise CacheError(f"head_dim {head_dim} must be a multiple of the group size {group}")
        self.bits, self.group, self.dtype, self.max_len = bits, group, dtype, max_len
        self.qmax = 127 if bits == 8 else 7
        per_value = 1 if bits == 8 else 2  # values per stored byte
        shape = (num_layers, 2, batch, kv_heads, max_len)
        self.data = torch.zeros(*shape, head_dim // per_value, dtype=torch.int8 if bits == 8 else torch.uint8,
                                device=device)
        self.scales = torch.zeros(*shape, head_dim // group, dtype=torch.float16, device=device)
        self.length = 0
        self.slot = None  # static mode is not supported: CUDA graphs use the plain KVCache

    @classmethod
    def for_config(cls, config: ModelConfig, batch: int, max_len: int, bits: int = 8, group: int = 64,
                   dtype: torch.dtype = torch.bfloat16, device="cpu") -> QuantizedKVCache:
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim, bits,
                   group, dtype, device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grouped = x.float().unflatten(-1, (-1, self.group))
        # Round the scale to its stored fp16 first, so dequantization uses exactly the scale the
        # values were quantized with: the error is then at most half a step.
        scale = (grouped.abs().amax(-1, keepdim=True) / self.qmax).to(torch.float16).float().clamp(min=2**-24)
        q = torch.round(grouped / scale).clamp(-self.qmax, self.qmax).to(torch.int8).flatten(-2)
        if self.bits == 4:
            nibbles = (q + 8).to(torch.uint8)  # 1..15
            q = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
        return q, scale.squeeze(-1).to(torch.float16)

    def _dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.bits == 4:
            q = torch.stack([(q & 15).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8], dim=-1).flatten(-2)
        grouped = q.float().unflatten(-1, (-1, self.group)) * scale.float()[..., None]
        return grouped.flatten(-2).to(self.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise CacheError(
                f"KV cache is full: {self.length} tokens stored + {k.shape[2]} new > max_len {self.max_len}"
            )
        for i, x in enumerate((k, v)):
            q, scale = self._quantize(x)
            self.data[layer, i, :, :, self.length:end] = q
            self.scales[layer, i, :, :, self.length:end] = scale
        return self.get(layer, end)

    def get(self, layer: int, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length if end is None else end
        k = self._dequantize(self.data[layer, 0, :, :, :end], self.scales[layer, 0, :, :, :end])
        v = self._dequantize(self.data[layer, 1, :, :, :end], self.scales[layer, 1, :, :, :end])
        return k, v
