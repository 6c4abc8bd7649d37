"""The sliding-window cache with attention sinks gives exactly full attention restricted to the
same tokens (sinks + the last `window`), at fixed memory, past the model's position limit."""

import pytest
import torch

import codecllm
from codecllm.errors import CacheError, ConfigError

SINKS, WINDOW = 2, 8


def windowed_reference(model, prompt, steps):
    """Greedy decoding by full recomputation with a mask: key j is visible to query p when
    j <= p and (j < SINKS or j > p - WINDOW)."""
    ids = torch.tensor([prompt])
    out = []
    for _ in range(steps):
        n = ids.shape[1]
        p = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        mask = ((j <= p) & ((j < SINKS) | (j > p - WINDOW)))[None, None]
        logits = model.module(ids, torch.arange(n)[None], mask, None)
        token = logits[0, -1].argmax()
        out.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return out


def test_sliding_window_equals_full_attention_over_the_same_window():
    model = codecllm.load("tiny", dtype="float32", kv=f"sliding:{WINDOW}:{SINKS}")
    prompt = [5, 9, 13, 21, 34, 55]
    assert model.generate(prompt, 20) == windowed_reference(model, prompt, 20)


def test_sliding_window_memory_is_fixed_and_unbounded_length_runs():
    model = codecllm.load("tiny", kv="sliding:16:4")
    model.config.max_position_embeddings = 32  # generation goes past it at fixed memory
    out = model.generate([1, 2, 3], 60)
    assert len(out) == 60


def test_prompt_longer_than_the_window_is_refused():
    model = codecllm.load("tiny", kv="sliding:4:2")
    with pytest.raises(CacheError, match="does not fit a sliding window"):
        model.generate(list(range(10)), 3)


@pytest.mark.parametrize("spec", ["sliding", "sliding:x", "sliding:0", "sliding:4:2:1"])
def test_bad_sliding_specs(spec):
    with pytest.raises(CacheError, match="sliding:WINDOW"):
        codecllm.load("tiny", kv=spec)


def test_padded_batches_are_refused():
    model = codecllm.load("tiny", kv="sliding:16")
    with pytest.raises(ConfigError, match="unpadded"):
        model.generate([[1, 2, 3], [4]], 2)
