"""enable_kv_cache on "someone else's code": a nanoGPT-style GPT written here with no cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import codecllm
from codecllm.errors import ConfigError

# ---- someone else's model: plain nanoGPT layout, no cache anywhere ----------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=97, block_size=64, n_layer=2, n_head=4, n_embd=32):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x)), None


# ---------------------------------------------------------------------------------------------


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    return GPT().eval()


PROMPT = [3, 14, 15, 92, 65, 35]


def test_cached_generation_equals_full_recompute(gpt):
    expected = codecllm.generate(gpt, PROMPT, 20)
    cache = codecllm.enable_kv_cache(gpt)
    got = codecllm.generate(gpt, PROMPT, 20)
    assert got == expected
    assert cache.length == len(PROMPT) + 19 and cache.nbytes > 0


def test_cached_logits_match_full_recompute(gpt):
    ids = torch.tensor([PROMPT])
    full, _ = gpt(ids)
    cache = codecllm.enable_kv_cache(gpt, max_seq_len=32)
    prefix, _ = gpt(ids[:, :4])
    step1, _ = gpt(ids[:, 4:5])
    step2, _ = gpt(ids[:, 5:6])
    incremental = torch.cat([prefix, step1, step2], dim=1)
    assert torch.allclose(incremental, full, atol=1e-5, rtol=1e-5)
    assert cache.length == 6


def test_disable_restores_the_original_bit_for_bit(gpt):
    ids = torch.tensor([PROMPT])
    before, _ = gpt(ids)
    codecllm.enable_kv_cache(gpt)
    gpt(ids)
    codecllm.disable_kv_cache(gpt)
    after, _ = gpt(ids)
    assert torch.equal(before.view(torch.int32), after.view(torch.int32))
    assert "forward" not in vars(gpt.transformer.h[0].attn)


def test_batched_prompts(gpt):
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    expected = codecllm.generate(gpt, ids, 8)
    codecllm.enable_kv_cache(gpt)
    assert torch.equal(codecllm.generate(gpt, ids, 8), expected)


def test_unsupported_model_says_what_it_looked_for():
    with pytest.raises(ConfigError, match="c_attn, c_proj"):
        codecllm.enable_kv_cache(nn.Sequential(nn.Linear(4, 4)))


def test_cache_overflow_is_a_clear_error(gpt):
    codecllm.enable_kv_cache(gpt, max_seq_len=8)
    with pytest.raises(Exception, match="KV cache is full"):
        codecllm.generate(gpt, PROMPT, 5)


def test_generate_works_for_our_models_and_engine_models():
    model = codecllm.load("tiny")
    assert codecllm.generate(model, [1, 2, 3], 4) == model.generate([1, 2, 3], 4)
    assert codecllm.generate(model.module, [1, 2, 3], 4) == model.generate([1, 2, 3], 4)
