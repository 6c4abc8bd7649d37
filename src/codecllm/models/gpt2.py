"""GPT-2. Hugging Face stores its projections as Conv1D, weight (in, out): the loader transposes
them into nn.Linear's (out, in), so the model itself is plain."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.models.config import ModelConfig
from codecllm.models.layers import attention
from codecllm.weights.experts import check_fresh

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.head_dim = layer, config.num_attention_heads, config.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, mask, kv_cache=None):
        b, t, h = x.shape
        q, k, v = self.c_attn(x).split(h, dim=2)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        y = attention(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, h))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x, mask, kv_cache=None):
        x = x + self.attn(self.ln_1(x), mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                kv_cache=None) -> torch.Tensor:
        if kv_cache is not None:
            check_fresh(kv_cache, self)
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block in t.h:
            x = block(x, mask, kv_cache)
        return self.lm_head(t.ln_f(x))
