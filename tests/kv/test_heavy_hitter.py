"""h2o: score-based eviction under a token budget."""

import pytest
import torch

import codecllm
from codecllm.errors import CacheError
from codecllm.kv.heavy_hitter import HeavyHitterKVCache

PROMPT = list(b"heavy hitters keep the tokens that matter")


def test_budget_at_least_the_sequence_equals_the_full_cache():
    full = codecllm.load("tiny", dtype="float32")
    h2o = codecllm.load("tiny", dtype="float32", kv="h2o:256:8")
    assert h2o.generate(PROMPT, 12) == full.generate(PROMPT, 12)


def test_budget_is_kept_and_generation_runs_past_it():
    model = codecllm.load("tiny", dtype="float32", kv="h2o:16:4")
    out = model.generate(PROMPT, 30)
    assert len(out) == 30


def test_eviction_drops_the_lowest_scores_but_never_recent_tokens():
    cache = HeavyHitterKVCache(1, 1, 1, 2, budget=4, recent=2, capacity=6, dtype=torch.float32)
    k = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1).repeat(1, 1, 1, 2)
    cache.update(0, k, k)
    cache.scores[0, :6] = torch.tensor([5.0, 0.1, 3.0, 0.2, 0.0, 0.0])  # the newest two score lowest
    cache.advance(6)
    assert cache.stored_per_layer == [4] and cache.evicted == 2
    kept = sorted(cache.positions[0, :4].tolist())
    assert kept == [0, 2, 4, 5]  # 1 and 3 had the lowest scores; 4 and 5 are recent
    assert sorted(cache.k[0, 0, 0, :4, 0].tolist()) == [0.0, 2.0, 4.0, 5.0]  # storage compacted with them


def test_observe_adds_probabilities():
    cache = HeavyHitterKVCache(1, 1, 1, 2, budget=8, recent=1, capacity=8, dtype=torch.float32)
    k = torch.randn(1, 1, 3, 2)
    keys, _ = cache.update(0, k, k)
    cache.observe(0, torch.randn(1, 2, 3, 2), keys)  # 2 query heads share the KV head
    assert cache.scores[0, :3].sum().item() == pytest.approx(2 * 3)  # each query's row sums to 1


@pytest.mark.parametrize("spec", ["h2o", "h2o:x", "h2o:0", "h2o:4:8"])
def test_bad_specs(spec):
    with pytest.raises(CacheError):
        codecllm.load("tiny", kv=spec).generate([1, 2], 2)


@pytest.mark.parametrize("kv, stored", [("on", 33), ("int8", 33), ("sliding:16:4", 20), ("h2o:16:4", 16)])
def test_stats_report_the_kv_cache(kv, stored):
    model = codecllm.load("tiny", kv=kv)
    model.generate(list(range(1, 11)), 24)  # 10 + 24 tokens seen; the last token is never fed back
    s = model.stats()
    assert s["kv"] == kv and s["kv_tokens"] == 33 and s["kv_tokens_stored"] == stored
    assert s["kv_cache_bytes"] > 0
    assert (s["kv_evicted"] > 0) == kv.startswith("h2o")
