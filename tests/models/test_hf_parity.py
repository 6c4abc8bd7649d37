"""Our models against `transformers` on random checkpoints saved with save_pretrained (fp32, CPU):
the same logits (1e-4 relative) and the same greedy tokens."""

import pytest
import torch

import codecllm
from codecllm.generate import positions_of
from codecllm.models.layers import causal_mask

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

FAMILIES = {
    "llama-llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
}


def hf_model(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                           bos_token_id=1, eos_token_id=2)
    else:
        config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # random biases and norms, so a bug in applying them shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(params=list(FAMILIES))
def pair(request, tmp_path):
    hf = hf_model(request.param)
    hf.save_pretrained(tmp_path / "model")
    ours = codecllm.load(tmp_path / "model", dtype="float32")
    return hf, ours


PROMPT = [5, 17, 42, 99, 123, 7, 250, 31]


def test_logits_match(pair):
    hf, ours = pair
    ids = torch.tensor([PROMPT])
    padding = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.module(ids, positions_of(padding), causal_mask(padding, ids.shape[1], ids.shape[1], "cpu"))
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_greedy_tokens_match(pair):
    hf, ours = pair
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids),
                               pad_token_id=0)[0, len(PROMPT):].tolist()
    got = ours.generate(PROMPT, max_new_tokens=12)
    assert got[: len(expected)] == expected


def test_compress_model_on_transformers_model_keeps_logits():
    hf = hf_model("llama-tied").to(torch.bfloat16)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        before = hf(ids).logits
        cache = codecllm.compress_model(hf, codec="nibble", cache="per-pass")
        after = hf(ids).logits
    assert torch.equal(before, after)
    names = [n for n, m in hf.named_modules() if type(m).__name__ == "CompressedLinear"]
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" in names
    assert cache.stats()["forward_passes"] == 1


@pytest.mark.parametrize("family", list(FAMILIES))
def test_enable_kv_cache_on_transformers_models(family):
    """Their generate() on our preallocated cache gives the same tokens as on their own cache."""
    hf = hf_model(family)
    ids = torch.tensor([PROMPT])
    kwargs = dict(max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.no_grad():
        theirs = hf.generate(ids, **kwargs)
        holder = codecllm.enable_kv_cache(hf, max_seq_len=64)
        ours = hf.generate(ids, **kwargs)
    storage = holder["cache"].codecllm_storage
    assert torch.equal(ours, theirs)
    assert holder["cache"].layers[0].keys.data_ptr() == storage.k.data_ptr()
    codecllm.disable_kv_cache(hf)
    assert "generate" not in vars(hf)
