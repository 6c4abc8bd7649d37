"""`codecllm bench kv`: seed 004's table (tokens/s without and with a KV cache by generation
length), KV memory per sequence for named configs, and the quality of the quantized caches."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from codecllm.engine import Model, load
from codecllm.generate import positions_of
from codecllm.kv.cache import cache_bytes
from codecllm.kv.variants import make_kv_cache
from codecllm.models.config import NAMED_CONFIGS, ModelConfig
from codecllm.models.layers import causal_mask
from codecllm.report import format_table, human_bytes

LENGTHS = (10, 25, 50, 100, 250, 1000)
VARIANTS = ("on", "int8", "int4", "sliding:32:4", "h2o:36:8")  # the last two hold 36 tokens of the text
FIXED_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
              "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season "
              "of Light, it was the season of Darkness.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed_by_length(model_name: str, device: str, lengths=LENGTHS) -> list[dict[str, Any]]:
    cached, uncached = load(model_name, device=device, kv=True), load(model_name, device=device, kv=False)
    prompt = cached.encode("Hello")
    rows = []
    for n in lengths:
        n = min(n, cached.config.max_position_embeddings - len(prompt))
        timings = {}
        for label, model in (("no cache", uncached), ("cache", cached)):
            model.generate(prompt, min(n, 10))  # warm-up: kernels, graphs, allocator
            _sync(model.device)
            start = time.perf_counter()
            model.generate(prompt, n)
            _sync(model.device)
            timings[label] = n / (time.perf_counter() - start)
        rows.append({"tokens": n, "no_cache_tok_s": timings["no cache"], "cache_tok_s": timings["cache"],
                     "speedup": timings["cache"] / timings["no cache"]})
    return rows


def memory_by_config(seq_len: int = 2048) -> list[dict[str, Any]]:
    rows = []
    for name in NAMED_CONFIGS:
        config = ModelConfig.from_name(name)
        dtype = getattr(torch, config.dtype)
        length = min(seq_len, config.max_position_embeddings)
        bf16 = cache_bytes(config, 1, length, dtype)
        rows.append({"config": name, "seq_len": length, "dtype": config.dtype, "bytes": bf16,
                     "weights_bytes": config.parameter_count() * dtype.itemsize})
    return rows


@torch.inference_mode()
def quantized_quality(model: Model, text: str = FIXED_TEXT) -> list[dict[str, Any]]:
    """Teacher-forced, token by token through each cache: perplexity and greedy agreement with
    the exact (full-precision) cache, and the cache's bytes (allocated: the sliding and h2o caches
    hold at most 36 tokens however long the text)."""
    ids = torch.tensor([model.encode(text)], device=model.device)
    n = ids.shape[1]
    dtype = next(p.dtype for p in model.module.parameters() if p.is_floating_point())
    results, reference = [], None
    for variant in VARIANTS:
        cache = make_kv_cache(variant, model.config, 1, n, dtype, model.device, prompt_len=1)
        logits = []
        for t in range(n):
            padding = torch.ones(1, t + 1, dtype=torch.bool, device=model.device)
            # Windowed and budgeted caches hold only past tokens: a decode step sees all of them.
            mask = None if getattr(cache, "unbounded", False) else causal_mask(padding, 1, t + 1, model.device)
            out = model.module(ids[:, t:t + 1], positions_of(padding)[:, -1:], mask, cache)
            cache.advance(1)
            logits.append(out[0, -1].float())
        logits = torch.stack(logits)
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        greedy = logits.argmax(-1)
        if reference is None:
            reference = greedy
        results.append({"kv": variant, "bytes": cache.nbytes, "perplexity": math.exp(nll.item()),
                        "greedy_agreement": (greedy == reference).float().mean().item()})
    base = results[0]
    for r in results:
        r["memory_vs_full"] = r["bytes"] / base["bytes"]
        r["perplexity_delta"] = r["perplexity"] - base["perplexity"]
    return results


def format_speed(rows) -> str:
    return format_table(["generation length", "no cache (tok/s)", "with cache (tok/s)", "speedup"],
                        [[f"{r['tokens']} tokens", f"{r['no_cache_tok_s']:.1f}", f"{r['cache_tok_s']:.1f}",
                          f"{r['speedup']:.1f}x"] for r in rows])


def format_memory(rows) -> str:
    return format_table(["config", "KV cache per sequence", "at length", "dtype", "vs weights"],
                        [[r["config"], human_bytes(r["bytes"]), r["seq_len"], r["dtype"],
                          f"{r['bytes'] / r['weights_bytes']:.1%}"] for r in rows])


def format_quality(rows) -> str:
    return format_table(["KV cache", "bytes", "vs full", "perplexity", "delta", "greedy agreement"],
                        [[r["kv"], human_bytes(r["bytes"]), f"{r['memory_vs_full']:.2f}x", f"{r['perplexity']:.3f}",
                          f"{r['perplexity_delta']:+.4f}", f"{r['greedy_agreement']:.1%}"] for r in rows])
