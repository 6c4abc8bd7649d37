"""SlidingWindowKVCache: attention sinks + a window of recent tokens (StreamingLLM), fixed memory.

The first `sinks` tokens stay for good; the next tokens fill a ring of `window` slots, each new
token overwriting the oldest. Keys are stored already rotated (RoPE at their absolute position),
and attention does not depend on the order of the keys it reads, so a ring needs no shifting.
A decode step attends to every stored token; a prompt must fit in sinks + window.
"""

from __future__ import annotations

import torch

from codecllm.errors import CacheError
from codecllm.kv.cache import CacheBase
from codecllm.models.config import ModelConfig


class SlidingWindowKVCache(CacheBase):
    unbounded = True  # generation may run past the model's position limit at fixed memory

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, window: int, sinks: int = 4,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        if window < 1 or sinks < 0:
            raise CacheError(f"sliding window needs window >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
        self.window, self.sinks, self.capacity = window, sinks, sinks + window
        shape = (num_layers, batch, kv_heads, self.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens seen, not tokens stored
        self.slot = None

    @classmethod
    def for_config(cls, config: ModelConfig, batch: int, window: int, sinks: int = 4,
                   dtype: torch.dtype = torch.bfloat16, device="cpu") -> SlidingWindowKVCache:
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim, window, sinks,
                   dtype, device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def stored(self) -> int:
        return min(self.length, self.capacity)

    def slot_of(self, position: int) -> int:
        if position < self.capacity:
            return position
        return self.sinks + (position - self.sinks) % self.window

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if t > 1 and self.length + t > self.capacity:
            raise CacheError(
                f"a prompt of {self.length + t} tokens does not fit a sliding window of {self.sinks} sinks + "
                f"{self.window} tokens; use a larger window"
            )
        for j in range(t):
            slot = self.slot_of(self.length + j)
            self.k[layer, :, :, slot] = k[:, :, j]
            self.v[layer, :, :, slot] = v[:, :, j]
        end = min(self.length + t, self.capacity)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def decode_mask(self) -> None:
        """A decode step may see every stored token: no mask."""
        return None
