"""The hybrid Mamba/attention model (seed 003): incremental decoding equals full recomputation."""

import pytest
import torch

import codecllm
from codecllm.errors import ConfigError


@pytest.fixture(scope="module")
def model():
    return codecllm.load("mambaformer-tiny")


PROMPT = [5, 9, 13, 21, 34, 55, 89]


def test_cached_greedy_equals_full_recompute(model):
    uncached = codecllm.load("mambaformer-tiny", kv=False)
    assert model.generate(PROMPT, 16) == uncached.generate(PROMPT, 16)


def test_seed_003_interface_token_by_token_matches_full(model):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        full = model.module(ids, return_dict=True)["logits"]
        out = model.module(input_ids=ids[:, :3], use_cache=True, return_dict=True)
        pieces, past = [out["logits"]], out["past_key_values"]
        for t in range(3, len(PROMPT)):
            out = model.module(input_ids=ids[:, t:t + 1], use_cache=True, past_key_values=past, return_dict=True)
            pieces.append(out["logits"])
            past = out["past_key_values"]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)
    layers = past.as_dict()["layers"]
    assert set(layers) == {"initial_mamba", "layer_0", "layer_1"}
    assert layers["initial_mamba"]["token_index"] == len(PROMPT)
    assert set(layers["layer_0"]) == {"mamba_cache", "attn_kv_cache", "cache_length"}
    assert layers["layer_0"]["cache_length"] == len(PROMPT)
    assert layers["layer_1"]["mamba_cache"]["ssm_state"].shape == (1, 256, 16)
    assert past.as_dict()["cache_length"] == len(PROMPT)


def test_compressed_hybrid_matches(model):
    compressed = codecllm.load("mambaformer-tiny", weights="huffman", cache="none")
    assert compressed.generate(PROMPT, 8) == model.generate(PROMPT, 8)
    assert compressed.stats()["compressed_layers"] > 0


def test_padded_batches_are_refused(model):
    with pytest.raises(ConfigError, match="unpadded"):
        model.generate([[1, 2, 3], [4]], 2)


def test_equal_length_batches_work(model):
    assert model.generate([PROMPT, PROMPT[::-1]], 4) == [model.generate(PROMPT, 4), model.generate(PROMPT[::-1], 4)]
