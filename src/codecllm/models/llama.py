"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5/3, TinyLlama, SmolLM).

Module and parameter names follow Hugging Face's, so their checkpoints load without a rename
table and a shape mismatch fails loudly in `load_state_dict`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.kv.cache import KVCache
from codecllm.models import fused
from codecllm.models.config import ModelConfig
from codecllm.models.layers import RMSNorm, apply_rope, attention, rope_cos_sin, rope_inverse_frequencies
from codecllm.weights.experts import check_fresh
from codecllm.weights.fast_linear import fused_projections


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)
        if config.qk_norm:  # Qwen3: per-head RMSNorm of queries and keys, before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, kv_cache=None):
        b, t, _ = x.shape
        sizes = (self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        qkv = fused_projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = qkv.split(sizes, dim=-1) if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.q_norm is None and t == 1 and type(kv_cache) is KVCache and kv_cache.slot is not None \
                and fused.enabled(q) and cos.dtype == q.dtype:
            # a CUDA-graph decode step: RoPE of q and k and the cache write in one kernel
            from codecllm.models.fused_kernels import decode_attention, decode_attention_fits, rope_kv_write

            k_all, v_all = kv_cache.k[self.layer], kv_cache.v[self.layer]
            q = rope_kv_write(q, k, v, cos, sin, k_all, v_all, kv_cache.slot)
            if decode_attention_fits(q, k_all, mask):  # reads only the filled slots, deterministic
                y = decode_attention(q, k_all, v_all, mask, kv_cache.slot)
            else:
                y = attention(q, k_all, v_all, mask)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer, k, v)
                if getattr(kv_cache, "wants_scores", False):  # score-based eviction (h2o)
                    kv_cache.observe(self.layer, q, k)
            y = attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        gated = fused_projections(x, (self.gate_proj, self.up_proj), gated=True)
        if gated is not None:
            return self.down_proj(gated)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if fused.enabled(gate) and up.dtype == gate.dtype:
            from codecllm.models.fused_kernels import silu_mul

            return self.down_proj(silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)


class LlamaBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x, delta = self.residual_forward(x, None, cos, sin, mask, kv_cache)
        return x + delta

    def residual_forward(self, x, pending, cos, sin, mask, kv_cache=None):
        """(residual stream, this block's MLP output not yet added): the caller adds it inside
        the next norm (one kernel instead of an add and a norm). `pending`: the previous
        block's MLP output, or None."""
        if pending is None:
            normed = self.input_layernorm(x)
        else:
            x, normed = self.input_layernorm.add_and_norm(x, pending)
        x, normed = self.post_attention_layernorm.add_and_norm(
            x, self.self_attn(normed, cos, sin, mask, kv_cache))
        return x, self.mlp(normed)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids (B, T), positions (B, T), mask (B, 1, T, S), kv_cache) -> logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                kv_cache=None) -> torch.Tensor:
        if kv_cache is not None:
            check_fresh(kv_cache, self)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        pending = None
        for block in self.model.layers:
            x, pending = block.residual_forward(x, pending, cos, sin, mask, kv_cache)
        x = self.model.norm(x) if pending is None else self.model.norm.add_and_norm(x, pending)[1]
        return self.lm_head(x)
