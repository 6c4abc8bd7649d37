"""Expert vectors: adapt, restore exactly, keep compressed bases compressed, invalidate caches."""

import pytest
import torch

import codecllm
from codecllm.errors import CacheError, ConfigError
from codecllm.generate import positions_of
from codecllm.kv import KVCache
from codecllm.models.layers import causal_mask
from codecllm.weights.experts import stamp

PROMPT = list(b"expert vectors")
LAYER = "model.layers.1.mlp.up_proj"


def logits(model, ids):
    ids = torch.tensor([ids])
    padding = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        return model.module(ids, positions_of(padding), causal_mask(padding, ids.shape[1], ids.shape[1], "cpu"))


@pytest.mark.parametrize("weights", [None, "huffman"])
def test_set_and_restore(weights):
    model = codecllm.load("tiny", dtype="float32" if weights is None else None, weights=weights, cache="all")
    before = logits(model, PROMPT)
    z = torch.linspace(0.5, 1.5, 256)
    model.set_expert_vectors({LAYER: z})
    adapted = logits(model, PROMPT)
    assert not torch.equal(adapted, before)
    model.set_expert_vectors(None)
    assert torch.equal(logits(model, PROMPT), before)


def test_ones_vector_reproduces_the_base_weight_closely():
    model = codecllm.load("tiny", dtype="float32")
    before = logits(model, PROMPT)
    model.set_expert_vectors({LAYER: torch.ones(256)})
    assert torch.allclose(logits(model, PROMPT), before, atol=1e-4)


def test_compressed_base_stays_compressed_and_cache_entry_is_dropped():
    model = codecllm.load("tiny", weights="nibble", cache="all")
    model.generate(PROMPT, 2)
    layer = dict(model.named_modules())[LAYER]
    encoded = layer.encoded
    assert id(layer.weight_store) in model.weight_cache.entries
    model.set_expert_vectors({LAYER: torch.full((256,), 1.1)})
    assert layer.encoded is encoded  # the compressed base is untouched
    assert id(layer.weight_store) not in model.weight_cache.entries  # its decompressed copy is gone
    assert (layer.in_features, layer.out_features) == (256, 688)


def test_a_stale_kv_cache_is_never_read():
    model = codecllm.load("tiny", dtype="float32")
    cache = stamp(KVCache.for_config(model.config, 1, 64, torch.float32), model.module)
    ids = torch.tensor([PROMPT])
    padding = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        model.module(ids, positions_of(padding), causal_mask(padding, ids.shape[1], ids.shape[1], "cpu"), cache)
    cache.advance(ids.shape[1])
    model.set_expert_vectors({LAYER: torch.full((256,), 0.9)})
    with pytest.raises(CacheError, match="weights changed"):
        with torch.no_grad():
            model.module(ids[:, :1], positions_of(padding)[:, :1], None, cache)


def test_stale_hybrid_state_cache_is_refused():
    model = codecllm.load("mambaformer-tiny")
    out = model.module(torch.tensor([[1, 2, 3]]), use_cache=True, return_dict=True)
    model.set_expert_vectors({"layers.0.mamba.out_proj": torch.ones(128)})
    with pytest.raises(CacheError):
        model.module(torch.tensor([[4]]), use_cache=True, past_key_values=out["past_key_values"], return_dict=True)


def test_generation_after_update_uses_new_weights():
    model = codecllm.load("tiny", dtype="float32")
    base = model.generate(PROMPT, 8)
    model.set_expert_vectors({LAYER: torch.full((256,), 3.0)})
    fresh = codecllm.load("tiny", dtype="float32")
    fresh.set_expert_vectors({LAYER: torch.full((256,), 3.0)})
    assert model.generate(PROMPT, 8) == fresh.generate(PROMPT, 8)
    model.set_expert_vectors(None)
    assert model.generate(PROMPT, 8) == base


@pytest.mark.parametrize("vectors, message", [({"nope": torch.ones(3)}, "no linear layer"),
                                               ({LAYER: torch.ones(10)}, "min\\(in, out\\) = 256")])
def test_bad_vectors(vectors, message):
    with pytest.raises(ConfigError, match=message):
        codecllm.load("tiny").set_expert_vectors(vectors)
