"""The preallocated KV cache: in-place O(1) updates, views, bounds, and its size formula."""

import pytest
import torch

import codecllm
from codecllm.errors import CacheError
from codecllm.kv import KVCache, cache_bytes
from codecllm.models import ModelConfig


def test_update_writes_in_place_and_returns_views():
    cache = KVCache(num_layers=2, batch=1, kv_heads=2, max_len=8, head_dim=4, dtype=torch.float32)
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    for step in range(8):
        k = torch.full((1, 2, 1, 4), float(step))
        keys, values = cache.update(0, k, k + 100)
        cache.advance(1)
        assert keys.shape == (1, 2, step + 1, 4)
        assert keys.data_ptr() == k_ptr and values.data_ptr() == v_ptr  # views of the same storage
        assert cache.k.data_ptr() == k_ptr
    assert torch.equal(cache.get(0)[0][0, 0, :, 0], torch.arange(8.0))


def test_writing_past_max_len_raises():
    cache = KVCache(1, 1, 1, max_len=4, head_dim=2)
    cache.update(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    cache.advance(4)
    with pytest.raises(CacheError, match="max_len 4"):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_reset_and_crop():
    cache = KVCache(1, 1, 1, max_len=4, head_dim=2)
    cache.advance(3)
    cache.crop(1)
    assert cache.get_seq_length() == 1
    cache.reset()
    assert cache.get_seq_length() == 0


def test_cache_bytes_equals_allocation():
    config = ModelConfig.from_name("tiny")
    cache = KVCache.for_config(config, batch=3, max_len=50, dtype=torch.bfloat16)
    assert cache.nbytes == cache_bytes(config, 3, 50, torch.bfloat16)


def test_cache_bytes_seed_004_formulas():
    """Seed 004's formula: layers x heads x seq x head_dim x 2 (K+V) x 4 bytes (fp32). Its printed
    results (~37 MB, ~4.7 GB) drop the factor 2 for K+V (and GPT-3's by 4): these are the real sizes."""
    gpt2 = ModelConfig.from_name("gpt2")
    assert cache_bytes(gpt2, 1, 1024, torch.float32) == 12 * 12 * 1024 * 64 * 2 * 4 == 75_497_472
    gpt3 = ModelConfig(arch="gpt2", vocab_size=50257, hidden_size=96 * 128, intermediate_size=4 * 96 * 128,
                       num_hidden_layers=96, num_attention_heads=96, max_position_embeddings=2048)
    assert cache_bytes(gpt3, 1, 2048, torch.float32) == 96 * 96 * 2048 * 128 * 2 * 4 == 19_327_352_832


@pytest.mark.parametrize("name", ["tiny"])
def test_cached_and_uncached_greedy_outputs_are_identical(name):
    with_cache = codecllm.load(name, dtype="float32")
    without = codecllm.load(name, dtype="float32", kv=False)
    prompt = with_cache.encode("KV caches turn O(n^2) into O(n)")
    assert with_cache.generate(prompt, 16) == without.generate(prompt, 16)
    batch = [prompt, prompt[:5], prompt[3:9]]
    assert with_cache.generate(batch, 8) == without.generate(batch, 8)


def test_batch_left_padding_matches_single_sequences():
    model = codecllm.load("tiny", dtype="float32")
    prompts = [model.encode("a longer prompt here"), model.encode("short")]
    batched = model.generate(prompts, 6)
    assert batched == [model.generate(p, 6) for p in prompts]
