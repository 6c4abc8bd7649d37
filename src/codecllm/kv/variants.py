"""KV cache variants selected by name: on (bf16/fp16, the model's dtype), off, int8, int4."""

from __future__ import annotations

import torch

from codecllm.errors import CacheError
from codecllm.kv.cache import KVCache
from codecllm.kv.heavy_hitter import HeavyHitterKVCache
from codecllm.kv.quantized import QuantizedKVCache
from codecllm.kv.sliding import SlidingWindowKVCache
from codecllm.models.config import ModelConfig

KV_VARIANTS = ("on", "off", "int8", "int4", "sliding:W[:SINKS]", "h2o:BUDGET[:RECENT]")


def parse_kv(spec: bool | str) -> str:
    """True/'on' -> 'on', False/'off' -> 'off', 'int8', 'int4', 'sliding:W[:SINKS]',
    'h2o:BUDGET[:RECENT]' (lower-cased). Raises CacheError otherwise."""
    if spec is True:
        return "on"
    if spec is False or spec is None:
        return "off"
    text = str(spec).strip().lower()
    if text in ("on", "off", "int8", "int4"):
        return text
    for name, first, second, example in (("sliding", "WINDOW", "SINKS", "512:4"),
                                         ("h2o", "BUDGET", "RECENT", "256:32")):
        if text == name or text.startswith(name + ":"):
            parts = text.split(":")[1:]
            if 1 <= len(parts) <= 2 and all(p.isdigit() for p in parts) and int(parts[0]) > 0:
                return text
            raise CacheError(f"KV cache {spec!r}: write {name}:{first} or {name}:{first}:{second} "
                             f"(whole numbers, {first} >= 1), e.g. {name}:{example}")
    raise CacheError(f"unknown KV cache {spec!r}; choose one of: {', '.join(KV_VARIANTS)}")


def check_kv_for(config: ModelConfig, variant: str) -> str:
    """`variant` (parsed) if the architecture takes it, else CacheError naming both."""
    if config.arch == "mambaformer" and variant not in ("on", "off"):
        raise CacheError(f"the hybrid Mamba/attention model takes kv on or off, not {variant!r}")
    if config.arch == "gpt2" and variant.startswith(("sliding:", "h2o:")):
        raise CacheError(f"KV cache {variant!r} needs a RoPE model (Llama family), not gpt2")
    return variant


def make_kv_cache(variant: str, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device,
                  prompt_len: int | None = None):
    check_kv_for(config, variant)
    if config.arch == "mambaformer":
        from codecllm.models.mambaformer import HybridCache

        return HybridCache(config, batch, max_len, dtype, device)
    if variant == "on":
        return KVCache.for_config(config, batch, max_len, dtype, device)
    if variant in ("int8", "int4"):
        return QuantizedKVCache.for_config(config, batch, max_len, bits=int(variant[3:]), dtype=dtype, device=device)
    if variant.startswith("sliding:"):
        window, *sinks = (int(p) for p in variant.split(":")[1:])
        return SlidingWindowKVCache.for_config(config, batch, window, sinks[0] if sinks else 4, dtype, device)
    if variant.startswith("h2o:"):
        budget, *recent = (int(p) for p in variant.split(":")[1:])
        recent_tokens = recent[0] if recent else max(1, budget // 4)
        return HeavyHitterKVCache.for_config(config, batch, budget, recent_tokens,
                                             prompt_len or max_len, dtype, device)
    raise CacheError(f"no cache for KV variant {variant!r}")
