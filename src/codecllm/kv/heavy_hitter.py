"""HeavyHitterKVCache: a token budget with score-based eviction (H2O).

Every layer accumulates, for each stored token, the attention probability it has received (summed
over heads, queries and the batch). After each forward pass, a layer holding more than `budget`
tokens evicts the lowest-scoring ones, never among the `recent` newest, and compacts its storage.
Keys are stored after RoPE, so the order of the stored tokens does not matter to attention.
Decode steps attend to every stored token; the prompt is attended in full (causally) and then cut
down to the budget, so storage is max(prompt, budget + 1) slots.
"""

from __future__ import annotations

import math

import torch

from codecllm.errors import CacheError
from codecllm.kv.cache import CacheBase
from codecllm.models.config import ModelConfig


class HeavyHitterKVCache(CacheBase):
    unbounded = True
    wants_scores = True

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, budget: int, recent: int,
                 capacity: int, dtype=torch.bfloat16, device="cpu"):
        if budget < 1 or not 0 <= recent <= budget:
            raise CacheError(f"h2o needs budget >= 1 and 0 <= recent <= budget, got budget={budget}, recent={recent}")
        self.budget, self.recent = budget, recent
        self.capacity = max(capacity, budget + 1)
        shape = (num_layers, batch, kv_heads, self.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scores = torch.zeros(num_layers, self.capacity, device=device)
        self.positions = torch.zeros(num_layers, self.capacity, dtype=torch.long, device=device)
        self.stored_per_layer = [0] * num_layers
        self.length = 0
        self.evicted = 0
        self.slot = None

    @classmethod
    def for_config(cls, config: ModelConfig, batch: int, budget: int, recent: int, prompt_len: int,
                   dtype=torch.bfloat16, device="cpu") -> HeavyHitterKVCache:
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim, budget, recent,
                   prompt_len, dtype, device)

    @property
    def stored(self) -> int:
        return max(self.stored_per_layer)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t, start = k.shape[2], self.stored_per_layer[layer]
        if start + t > self.capacity:
            raise CacheError(f"h2o cache: {start} stored + {t} new > {self.capacity} slots")
        self.k[layer, :, :, start:start + t] = k
        self.v[layer, :, :, start:start + t] = v
        self.positions[layer, start:start + t] = torch.arange(self.length, self.length + t, device=k.device)
        self.scores[layer, start:start + t] = 0
        self.stored_per_layer[layer] = start + t
        return self.k[layer, :, :, :start + t], self.v[layer, :, :, :start + t]

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Add this pass's attention probabilities (queries q over stored keys k) to the scores."""
        groups = q.shape[1] // k.shape[1]
        keys = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        logits = (q.float() @ keys.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        t, s = q.shape[2], keys.shape[2]
        visible = torch.arange(s, device=q.device)[None, :] <= torch.arange(s - t, s, device=q.device)[:, None]
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
        self.scores[layer, :s] += probs.sum(dim=(0, 1, 2))

    def advance(self, tokens: int) -> None:
        self.length += tokens
        for layer, stored in enumerate(self.stored_per_layer):
            if stored > self.budget:
                self._evict(layer, stored - self.budget)

    def _evict(self, layer: int, count: int) -> None:
        stored = self.stored_per_layer[layer]
        scores = self.scores[layer, :stored].clone()
        scores[self.positions[layer, :stored] >= self.length - self.recent] = float("inf")  # keep the recent
        drop = torch.topk(scores, count, largest=False).indices
        keep = torch.ones(stored, dtype=torch.bool, device=scores.device)
        keep[drop] = False
        index = keep.nonzero().view(-1)
        kept = index.numel()
        for store in (self.k, self.v):
            store[layer, :, :, :kept] = store[layer, :, :, index]
        self.scores[layer, :kept] = self.scores[layer, index]
        self.positions[layer, :kept] = self.positions[layer, index]
        self.stored_per_layer[layer] = kept
        self.evicted += count

    def reset(self) -> None:
        self.length = 0
        self.stored_per_layer = [0] * len(self.stored_per_layer)
