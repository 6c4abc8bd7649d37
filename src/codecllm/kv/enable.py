"""enable_kv_cache: add KV caching to a causal transformer we did not write, without editing it.

Supported layout (nanoGPT / minGPT style): attention modules with a fused qkv projection `c_attn`,
an output projection `c_proj` and `n_head`, and learned position embeddings `wpe` that the model
indexes with positions 0..T-1. Their `forward` methods are replaced on the instances only (the
class is untouched), the position embedding is offset by the number of cached tokens, and a hook
on the root module commits each pass. `disable_kv_cache` removes all of it, so the model computes
exactly what it computed before.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.errors import CacheError, ConfigError
from codecllm.kv.cache import KVCache

_STATE = "_codecllm_kv"


class AttachedKVCache:
    """The cache enable_kv_cache returns: allocated on the first forward (when the batch size,
    dtype and device are known), reset between prompts, committed after every pass."""

    def __init__(self, layers: int, heads: int, head_dim: int, max_seq_len: int):
        self.layers, self.heads, self.head_dim, self.max_seq_len = layers, heads, head_dim, max_seq_len
        self.cache: KVCache | None = None
        self.pending = 0

    @property
    def length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def reset(self) -> None:
        self.cache = None  # re-allocated for the next prompt's batch size

    def _ensure(self, like: torch.Tensor) -> KVCache:
        batch = like.shape[0]
        if self.cache is None or self.cache.k.shape[1] != batch:
            self.cache = KVCache(self.layers, batch, self.heads, self.max_seq_len, self.head_dim, like.dtype,
                                 like.device)
        return self.cache


def _find_layout(model: nn.Module):
    attention = [m for m in model.modules()
                 if hasattr(m, "c_attn") and hasattr(m, "c_proj") and hasattr(m, "n_head")]
    positions = [m for name, m in model.named_modules() if name.split(".")[-1] == "wpe" and isinstance(m, nn.Embedding)]
    if not attention or len(positions) != 1:
        raise ConfigError(
            "enable_kv_cache found no supported layout: it looks for attention modules with c_attn, c_proj "
            f"and n_head (found {len(attention)}) and one nn.Embedding named wpe (found {len(positions)}); "
            "codecllm's own models take a KVCache directly (codecllm.load(..., kv=True))"
        )
    return attention, positions[0]


def enable_kv_cache(model: nn.Module, max_seq_len: int | None = None):
    """Add a KV cache to `model` in place and return it. Raises ConfigError for unknown layouts.

    nanoGPT-style models: their attention runs on our cache (an AttachedKVCache is returned).
    transformers models: their generate() uses our preallocated cache through their Cache
    interface (a dict whose "cache" is the one the last generate call used)."""
    if getattr(model, _STATE, None) is not None:
        raise CacheError("this model already has a KV cache; call disable_kv_cache(model) first")
    from codecllm.kv.hf_cache import is_transformers_model, patch_generate

    if is_transformers_model(model):
        holder = patch_generate(model, max_seq_len)
        setattr(model, _STATE, ("transformers", holder))
        return holder
    attention, wpe = _find_layout(model)
    max_seq_len = max_seq_len or wpe.num_embeddings
    if max_seq_len > wpe.num_embeddings:
        raise ConfigError(f"max_seq_len {max_seq_len} exceeds the model's {wpe.num_embeddings} positions")
    first = attention[0]
    n_embd = first.c_attn.in_features if hasattr(first.c_attn, "in_features") else first.c_attn.weight.shape[-1]
    state = AttachedKVCache(len(attention), first.n_head, n_embd // first.n_head, max_seq_len)

    for layer, module in enumerate(attention):
        module.forward = types.MethodType(_cached_attention(layer, state), module)
    wpe.forward = types.MethodType(_offset_positions(state), wpe)

    def before(_module, args, kwargs):
        idx = args[0] if args else next(iter(kwargs.values()))
        state.pending = idx.shape[1]
        if state.length + state.pending > state.max_seq_len:
            raise CacheError(f"KV cache is full: {state.length} cached + {state.pending} new > {state.max_seq_len}")

    def after(_module, _args, _output):
        if state.cache is not None:
            state.cache.advance(state.pending)

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after)]
    setattr(model, _STATE, (state, attention, wpe, hooks))
    return state


def disable_kv_cache(model: nn.Module) -> None:
    """Undo enable_kv_cache: the original forward methods, no hooks, no cache."""
    saved = getattr(model, _STATE, None)
    if saved is None:
        return
    if saved[0] == "transformers":
        del model.generate  # the class's generate shows through again
        setattr(model, _STATE, None)
        return
    _, attention, wpe, hooks = saved
    for module in attention:
        del module.forward  # the instance attribute: the class's forward shows through again
    del wpe.forward
    for hook in hooks:
        hook.remove()
    setattr(model, _STATE, None)


def attached_cache(model: nn.Module) -> AttachedKVCache | None:
    saved = getattr(model, _STATE, None)
    return saved[0] if saved and saved[0] != "transformers" else None


def _offset_positions(state: AttachedKVCache):
    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + state.length, self.weight, self.padding_idx)
    return forward


def _cached_attention(layer: int, state: AttachedKVCache):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        cache = state._ensure(k)
        start = cache.length
        k, v = cache.update(layer, k, v)
        rows = torch.arange(start, start + t, device=x.device)[:, None]
        mask = torch.arange(start + t, device=x.device)[None, :] <= rows
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        dropout = getattr(self, "resid_dropout", None)
        y = self.c_proj(y)
        return dropout(y) if dropout is not None else y
    return forward
