"""MambaFormer (seed 003): Mamba (selective state-space) blocks interleaved with attention blocks.

    initial_mamba -> [attention block -> mamba block] x num_hidden_layers -> norm -> lm_head

Pure PyTorch; the selective scan runs step by step (a reference, not a fast kernel). Attention
uses no positional encoding: the Mamba blocks carry order. The cache (`HybridCache`) keeps, per
layer, seed 003's structure: Mamba: conv state, SSM state, token index; attention: keys/values;
and the shared `cache_length`. Incremental decoding equals full recomputation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.errors import CacheError
from codecllm.kv.cache import KVCache
from codecllm.models.config import ModelConfig
from codecllm.models.layers import RMSNorm, attention
from codecllm.weights.experts import check_fresh, stamp


class MambaBlock(nn.Module):
    def __init__(self, config: ModelConfig, name: str):
        super().__init__()
        self.name = name
        d, inner, state = config.hidden_size, config.ssm_expand * config.hidden_size, config.ssm_state_size
        self.inner, self.state, self.kernel = inner, state, config.ssm_conv_kernel
        self.dt_rank = math.ceil(d / 16)
        self.norm = RMSNorm(d, config.norm_eps)
        self.in_proj = nn.Linear(d, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, self.kernel, groups=inner, bias=True)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)

    def forward(self, hidden: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """hidden (B, T, d). `cache`: this layer's dict (conv_state, ssm_state, token_index), or None."""
        b, t, _ = hidden.shape
        x, z = self.in_proj(self.norm(hidden)).chunk(2, dim=-1)  # (B, T, inner) each
        x = x.transpose(1, 2)  # (B, inner, T)
        previous = cache["conv_state"] if cache is not None else x.new_zeros(b, self.inner, self.kernel - 1)
        window = torch.cat([previous, x], dim=2)  # causal: the last kernel-1 inputs come first
        x = F.silu(F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.inner))  # (B, inner, T)
        dt, bmat, cmat = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.state, self.state], dim=-1)
        dt = F.softplus(self.dt_proj(dt)).float()  # (B, T, inner)
        a = -torch.exp(self.A_log.float())  # (inner, state)
        h = cache["ssm_state"] if cache is not None else x.new_zeros(b, self.inner, self.state, dtype=torch.float32)
        xs = x.transpose(1, 2).float()
        ys = []
        for step in range(t):  # h_t = exp(dt A) h_{t-1} + dt B_t x_t ;  y_t = C_t . h_t + D x_t
            decay = torch.exp(dt[:, step, :, None] * a)
            h = decay * h + (dt[:, step, :, None] * bmat[:, step, None, :].float()) * xs[:, step, :, None]
            ys.append((h * cmat[:, step, None, :].float()).sum(-1) + self.D.float() * xs[:, step])
        y = torch.stack(ys, dim=1).to(hidden.dtype) * F.silu(z)
        if cache is not None:
            cache["conv_state"] = window[:, :, -(self.kernel - 1):] if self.kernel > 1 else window[:, :, :0]
            cache["ssm_state"] = h
            cache["token_index"] += t
        return hidden + self.out_proj(y)


class AttentionBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        d = config.hidden_size
        self.layer, self.heads, self.head_dim = layer, config.num_attention_heads, config.head_dim
        self.norm = RMSNorm(d, config.norm_eps)
        self.qkv_proj = nn.Linear(d, 3 * self.heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.mlp_norm = RMSNorm(d, config.norm_eps)
        self.up_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=False)

    def forward(self, hidden, mask, kv: KVCache | None):
        b, t, _ = hidden.shape
        q, k, v = self.qkv_proj(self.norm(hidden)).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is not None:
            k, v = kv.update(self.layer, k, v)
        y = attention(q, k, v, mask).transpose(1, 2).reshape(b, t, -1)
        hidden = hidden + self.o_proj(y)
        return hidden + self.down_proj(F.gelu(self.up_proj(self.mlp_norm(hidden)), approximate="tanh"))


class HybridCache:
    """Seed 003's cache: {"layers": {"initial_mamba": {...}, "layer_0": {"mamba_cache": {...},
    "attn_kv_cache": (k, v) views, "cache_length": n}, ...}} over preallocated attention storage."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype=torch.bfloat16, device="cpu"):
        self.attention = KVCache(config.num_hidden_layers, batch, config.num_attention_heads, max_len,
                                 config.head_dim, dtype, device)
        self.max_len = max_len
        self.slot = None
        inner = config.ssm_expand * config.hidden_size

        def mamba_state():
            return {"conv_state": torch.zeros(batch, inner, config.ssm_conv_kernel - 1, dtype=dtype, device=device),
                    "ssm_state": torch.zeros(batch, inner, config.ssm_state_size, device=device),
                    "token_index": 0}

        self.layers: dict = {"initial_mamba": mamba_state()}
        for i in range(config.num_hidden_layers):
            self.layers[f"layer_{i}"] = {"mamba_cache": mamba_state(), "attn_kv_cache": None, "cache_length": 0}

    @property
    def length(self) -> int:
        return self.attention.length

    @property
    def stored(self) -> int:
        return self.attention.length

    @property
    def nbytes(self) -> int:
        states = sum(s["conv_state"].nbytes + s["ssm_state"].nbytes for s in self._mamba_states())
        return self.attention.nbytes + states

    def _mamba_states(self):
        yield self.layers["initial_mamba"]
        for name, layer in self.layers.items():
            if name != "initial_mamba":
                yield layer["mamba_cache"]

    def update(self, layer: int, k, v):
        k, v = self.attention.update(layer, k, v)
        entry = self.layers[f"layer_{layer}"]
        entry["attn_kv_cache"], entry["cache_length"] = (k, v), k.shape[2]
        return k, v

    def advance(self, tokens: int) -> None:
        self.attention.advance(tokens)

    def get_seq_length(self) -> int:
        return self.attention.length

    def reset(self) -> None:
        raise CacheError("a hybrid cache holds recurrent state: make a new one instead of resetting it")

    def as_dict(self) -> dict:
        return {"layers": self.layers, "cache_length": self.length}


class MambaFormer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.initial_mamba = MambaBlock(config, "initial_mamba")
        self.layers = nn.ModuleList(
            nn.ModuleDict({"attention": AttentionBlock(config, i), "mamba": MambaBlock(config, f"layer_{i}")})
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions=None, mask=None, kv_cache: HybridCache | None = None,
                *, use_cache: bool = False, past_key_values: HybridCache | None = None, return_dict: bool = False):
        """Engine form: forward(ids, positions, mask, cache) -> logits. Seed 003's form:
        forward(ids, use_cache=True, past_key_values=cache, return_dict=True) -> {"logits",
        "past_key_values"}; a new cache is made when none is given."""
        seed_form = use_cache or past_key_values is not None or return_dict
        cache = kv_cache if not seed_form else past_key_values
        if seed_form and use_cache and cache is None:
            b, t = input_ids.shape
            cache = HybridCache(self.config, b, self.config.max_position_embeddings, self.embed_tokens.weight.dtype,
                                input_ids.device)
        if cache is not None:
            if seed_form and past_key_values is None:
                stamp(cache, self)
            check_fresh(cache, self)
        t = input_ids.shape[1]
        if mask is None:
            start = cache.length if cache is not None else 0
            rows = torch.arange(start, start + t, device=input_ids.device)[:, None]
            mask = (torch.arange(start + t, device=input_ids.device)[None, :] <= rows)[None, None]
        x = self.embed_tokens(input_ids)
        x = self.initial_mamba(x, cache.layers["initial_mamba"] if cache is not None else None)
        for i, layer in enumerate(self.layers):
            x = layer["attention"](x, mask, cache)
            x = layer["mamba"](x, cache.layers[f"layer_{i}"]["mamba_cache"] if cache is not None else None)
        logits = self.lm_head(self.norm(x))
        if not seed_form:
            return logits
        if cache is not None and seed_form:
            cache.advance(t)
        return {"logits": logits, "past_key_values": cache if use_cache else None}
