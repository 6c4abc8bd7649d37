"""Models from a named config with seeded random weights, in the Hugging Face layout.

Weights are N(0, 0.02) (what trained weights look like to the codecs: DESIGN.md), norms near 1,
biases small. Each tensor has its own generator seeded from (seed, name), so a tensor does not
depend on which others were made before it.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from codecllm.models.config import ModelConfig


def hf_parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter names and shapes for `config` (what transformers saves); for our
    own architectures (mambaformer), the names and shapes of our module."""
    if config.arch == "mambaformer":
        from codecllm.models.loader import build_model

        with torch.device("meta"):
            return {n: tuple(p.shape) for n, p in build_model(config).named_parameters()}
    h, v, f = config.hidden_size, config.vocab_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    if config.arch == "gpt2":
        shapes["transformer.wte.weight"] = (v, h)
        shapes["transformer.wpe.weight"] = (config.max_position_embeddings, h)
        for i in range(config.num_hidden_layers):
            p = f"transformer.h.{i}."
            shapes.update({
                p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
                p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
                p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
                p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                p + "mlp.c_fc.weight": (h, f), p + "mlp.c_fc.bias": (f,),
                p + "mlp.c_proj.weight": (f, h), p + "mlp.c_proj.bias": (h,),
            })
        shapes["transformer.ln_f.weight"] = (h,)
        shapes["transformer.ln_f.bias"] = (h,)
        return shapes
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    shapes["model.embed_tokens.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if config.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (config.head_dim,),
                           p + "self_attn.k_norm.weight": (config.head_dim,)})
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_state_dict(
    config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Seeded random weights with Hugging Face names, in `dtype` (default: the config's)."""
    dtype = dtype or getattr(torch, config.dtype)
    state = {}
    for name, shape in hf_parameter_shapes(config).items():
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
        is_norm = len(shape) == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight")
        if is_norm:
            t = 1.0 + 0.1 * t
        elif name.endswith("A_log"):  # the SSM's standard init: decay rates 1..state_size
            t = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32, device=device)).repeat(shape[0], 1)
        elif name.endswith(".D"):
            t = torch.ones(shape, device=device)
        else:
            t = 0.02 * t
        state[name] = t.to(dtype)
    return state


def save_hf_directory(config: ModelConfig, state: dict[str, torch.Tensor], path: str | Path,
                      max_shard_bytes: int = 4 << 30) -> Path:
    """Write config.json and *.safetensors (sharded, with an index, when large) to `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def write_random_model(name_or_config: str | ModelConfig, path: str | Path, seed: int = 0,
                       device: str | torch.device = "cpu") -> Path:
    """Build a named config with seeded random weights and save it as a HF-layout directory."""
    config = (ModelConfig.from_name(name_or_config) if isinstance(name_or_config, str)
              else name_or_config)
    return save_hf_directory(config, random_state_dict(config, seed, device), path)
