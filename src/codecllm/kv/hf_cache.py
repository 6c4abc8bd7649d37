"""Our preallocated KV cache behind transformers' Cache interface.

`hf_kv_cache(model, batch, max_seq_len)` builds a `transformers.Cache` whose layers write into one
preallocated KVCache (O(1) updates in place, views returned) instead of concatenating tensors, so
any transformers model of the supported families runs on our storage with its own generate().
"""

from __future__ import annotations

import torch

from codecllm.errors import CacheError
from codecllm.kv.cache import KVCache


def hf_kv_cache(model, batch: int, max_seq_len: int | None = None):
    from transformers.cache_utils import Cache, DynamicLayer

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    max_seq_len = max_seq_len or config.max_position_embeddings
    parameter = next(model.parameters())
    storage = KVCache(layers, batch, heads, max_seq_len, head_dim, parameter.dtype, parameter.device)

    class PreallocatedLayer(DynamicLayer):
        """One layer's slice of `storage`: update writes in place at the current length."""

        def __init__(self, index: int):
            super().__init__()
            self.index, self.length = index, 0

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > storage.max_len or key_states.shape[0] != storage.k.shape[1]:
                raise CacheError(
                    f"codecllm KV cache holds batch {storage.k.shape[1]} x {storage.max_len} tokens; got batch "
                    f"{key_states.shape[0]} and {end} tokens"
                )
            storage.k[self.index, :, :, self.length:end] = key_states
            storage.v[self.index, :, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = storage.k[self.index, :, :, :end], storage.v[self.index, :, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0
            self.keys = self.values = None

        def crop(self, tokens_to_remove: int) -> None:
            self.length = max(0, self.length - tokens_to_remove) if tokens_to_remove > 0 else -tokens_to_remove
            end = self.length
            self.keys, self.values = storage.k[self.index, :, :, :end], storage.v[self.index, :, :, :end]

    cache = Cache(layers=[PreallocatedLayer(i) for i in range(layers)])
    cache.codecllm_storage = storage
    return cache


def is_transformers_model(model) -> bool:
    return hasattr(model, "generate") and hasattr(model, "config") and hasattr(model.config, "model_type")


def patch_generate(model, max_seq_len: int | None):
    """Make model.generate use a fresh codecllm cache unless one is passed; returns the holder."""
    original = model.generate
    holder = {"cache": None}

    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            batch = ids.shape[0] if isinstance(ids, torch.Tensor) else 1
            holder["cache"] = hf_kv_cache(model, batch, max_seq_len)
            kwargs["past_key_values"] = holder["cache"]
        return original(*args, **kwargs)

    model.generate = generate
    return holder
