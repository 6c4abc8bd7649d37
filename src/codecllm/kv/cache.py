"""A preallocated KV cache: O(1) append, same storage for the whole generation.

Layout: k and v are each (layers, batch, kv_heads, max_len, head_dim), so a layer's slice is
the (B, H, S, D) tensor attention kernels take, contiguous along S for each head.
"""

from __future__ import annotations

import torch

from codecllm.errors import CacheError
from codecllm.models.config import ModelConfig


def cache_bytes(config: ModelConfig, batch: int, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes a KV cache for `batch` sequences of `seq_len` tokens holds: K and V, every layer."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * batch * seq_len * dtype.itemsize


class CacheBase:
    """What every KV cache variant shares: `length` counts the tokens seen; a forward pass writes
    at [length, length + T) in every layer and `advance(T)` commits them after the pass."""

    length: int = 0
    slot: torch.Tensor | None = None  # static (CUDA-graph) write position, plain KVCache only

    @property
    def stored(self) -> int:
        """Tokens actually held (windowed and budgeted caches hold fewer than they have seen)."""
        return self.length

    def advance(self, tokens: int) -> None:
        self.length += tokens

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0


class KVCache(CacheBase):
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        if min(num_layers, batch, kv_heads, max_len, head_dim) <= 0:
            raise CacheError(
                f"KV cache dimensions must be positive: layers={num_layers}, batch={batch}, "
                f"kv_heads={kv_heads}, max_len={max_len}, head_dim={head_dim}"
            )
        shape = (num_layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # tokens stored; every layer writes the same positions in one pass
        # Static mode (CUDA graphs): the write position is a device tensor `slot`, attention reads
        # all max_len positions and a mask hides the ones not written yet.
        self.slot: torch.Tensor | None = None

    @classmethod
    def for_config(cls, config: ModelConfig, batch: int, max_len: int,
                   dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> KVCache:
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim,
                   dtype, device)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, T, D) at positions [length, length + T) of `layer`, in place, and
        return views of everything stored for that layer, these T included. In static mode,
        write one token at `slot` and return the whole buffers."""
        if self.slot is not None:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise CacheError(
                f"KV cache is full: {self.length} tokens stored + {k.shape[2]} new > max_len {self.max_len}"
            )
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise CacheError(f"cannot crop a cache of {self.length} tokens to {length}")
        self.length = length
