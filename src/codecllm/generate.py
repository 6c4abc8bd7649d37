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
    cuda_graph: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids (on the model's device), one step at a time.

    input_ids, padding: (B, T), left-padded; max_len: the model's position limit.
    cuda_graph: capture one decode step as a CUDA graph and replay it (needs kv; the first
    token comes from an eager prefill).
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
    if cuda_graph and cache is not None and max_new_tokens > 1:
        yield from _graphed_decode(model, cache, padding, positions, logits, max_new_tokens, sampling, generator,
                                   on_step)
        return
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


def _graphed_decode(model, cache, padding, positions, logits, max_new_tokens, sampling, generator, on_step):
    """Decode with one step captured as a CUDA graph: token, positions and the cache slot live in
    static device buffers and advance inside the graph, so greedy decoding needs no host sync."""
    batch, prompt_len = padding.shape
    device = padding.device
    weight_cache = getattr(model, "weight_cache", None)
    greedy = sampling.temperature == 0
    token = sample(logits[:, -1], sampling, generator).view(batch, 1).clone()
    position = (positions[:, -1:] + 1).clone()
    slot = torch.tensor([prompt_len], device=device)
    full_padding = torch.ones(batch, cache.max_len, dtype=torch.bool, device=device)
    full_padding[:, :prompt_len] = padding
    columns = torch.arange(cache.max_len, device=device)
    cache.slot = slot
    out = {}

    def step():
        mask = (columns <= slot)[None, None, None, :] & full_padding[:, None, None, :]
        out["logits"] = model(token, position, mask, cache)[:, -1]
        if greedy:
            token.copy_(out["logits"].argmax(-1, keepdim=True))
        position.add_(1)
        slot.add_(1)

    saved = (token.clone(), position.clone(), slot.clone())
    counters = weight_cache.counters() if weight_cache is not None else None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # compile kernels, fill caches, settle the allocator
            step()
            for buffer, value in zip((token, position, slot), saved):
                buffer.copy_(value)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    before_capture = weight_cache.counters() if weight_cache is not None else None
    with torch.cuda.graph(graph):
        step()
    if weight_cache is not None:  # count replays only: one captured pass's work per replay
        per_pass = {k: v - before_capture[k] for k, v in weight_cache.counters().items()}
        for name, value in counters.items():
            setattr(weight_cache, name, value)
    for buffer, value in zip((token, position, slot), saved):
        buffer.copy_(value)

    try:
        yield token.view(-1).clone()
        if on_step is not None:
            on_step(0)
        for i in range(1, max_new_tokens):
            graph.replay()
            if weight_cache is not None:
                weight_cache.add_counters(per_pass)
            if not greedy:
                token.copy_(sample(out["logits"], sampling, generator).view(batch, 1))
            yield token.view(-1).clone()
            if on_step is not None:
                on_step(i)
    finally:
        cache.slot = None
