"""The generation loop: prefill, decode, sampling, streaming.

With a KV cache, prefill runs the whole prompt once and each decode step runs one token; without
one, every step recomputes the whole sequence (O(n²), the baseline seed 004 measures).
Batches are left-padded: `padding` marks real tokens, positions count only those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from codecllm.errors import ConfigError
from codecllm.kv.cache import KVCache
from codecllm.models.layers import causal_mask


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy when temperature is 0."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > sampling.top_p  # keep the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def positions_of(padding: torch.Tensor) -> torch.Tensor:
    """Left padding: each real token's position counts the real tokens before it."""
    return (padding.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def generate_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    padding: torch.Tensor,
    max_new_tokens: int,
    *,
    max_len: int,
    sampling: Sampling | None = None,
    kv: bool = True,
    kv_dtype: torch.dtype | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids, one step at a time.

    input_ids, padding: (B, T), left-padded; max_len: the model's position limit.
    """
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ConfigError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len + max_new_tokens > max_len:
        raise ConfigError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"maximum length {max_len}"
        )
    sampling = sampling or Sampling()
    device = input_ids.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = None
    if kv:
        config = model.config
        dtype = kv_dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        cache = KVCache.for_config(config, batch, prompt_len + max_new_tokens, dtype, device)

    tokens, mask_padding = input_ids, padding
    positions = positions_of(padding)
    logits = model(tokens, positions, causal_mask(padding, prompt_len, prompt_len, device), cache)
    if cache is not None:
        cache.advance(prompt_len)
    for step in range(max_new_tokens):
        next_token = sample(logits[:, -1], sampling, generator)
        yield next_token
        if on_step is not None:
            on_step(step)
        if step == max_new_tokens - 1:
            break
        mask_padding = torch.cat([mask_padding, mask_padding.new_ones(batch, 1)], dim=1)
        total = mask_padding.shape[1]
        if cache is not None:
            position = positions[:, -1:] + 1
            positions = torch.cat([positions, position], dim=1)
            logits = model(next_token[:, None], position, causal_mask(mask_padding, 1, total, device), cache)
            cache.advance(1)
        else:
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            positions = positions_of(mask_padding)
            logits = model(tokens, positions, causal_mask(mask_padding, total, total, device), None)
