"""Build a model and fill it: from a HF-layout directory, a codecllm checkpoint or a named config."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from codecllm import checkpoint
from codecllm.codecs import EncodedTensor, decode, encode
from codecllm.errors import ConfigError
from codecllm.models.config import NAMED_CONFIGS, ModelConfig
from codecllm.models.gpt2 import CONV1D_WEIGHTS, GPT2LMHeadModel
from codecllm.models.llama import LlamaForCausalLM
from codecllm.models.synthetic import random_state_dict
from codecllm.weights.cache import CompressedWeight, WeightCache
from codecllm.weights.compress_model import _set_submodule
from codecllm.weights.modules import CompressedEmbedding, CompressedLinear


def build_model(config: ModelConfig) -> nn.Module:
    if config.arch == "mambaformer":
        from codecllm.models.mambaformer import MambaFormer

        return MambaFormer(config)
    return GPT2LMHeadModel(config) if config.arch == "gpt2" else LlamaForCausalLM(config)


def resolve(path_or_config: str | Path) -> tuple[ModelConfig, Path | None]:
    """(config, directory or None for a named config with random weights)."""
    path = Path(path_or_config)
    if path.is_dir():
        return ModelConfig.from_dir(path), path
    if str(path_or_config) in NAMED_CONFIGS:
        return ModelConfig.from_name(str(path_or_config)), None
    raise ConfigError(
        f"{str(path_or_config)!r} is neither a model directory nor a named config; "
        f"named configs: {', '.join(NAMED_CONFIGS)}"
    )


def _is_conv1d(config: ModelConfig, name: str) -> bool:
    return config.arch == "gpt2" and name.endswith(CONV1D_WEIGHTS)


def load_weights(model: nn.Module, config: ModelConfig, directory: Path | None, device: torch.device,
                 dtype: torch.dtype | None, cache: WeightCache, seed: int = 0) -> int:
    """Fill `model` (built on the meta device) in place. Returns the number of compressed modules."""
    if directory is None:
        # Made on the target device: fast for billions of weights on a GPU; seeded per device.
        state = random_state_dict(config, seed, device=device, dtype=dtype)
        items = ((name, t) for name, t in state.items())
    elif checkpoint.is_checkpoint(directory):
        items = ((name, value) for name, _, value in checkpoint.iter_encoded(directory))
    else:
        items = ((name, t) for name, _, t in checkpoint.iter_safetensors(checkpoint.safetensors_files(directory)))

    plain: dict[str, torch.Tensor] = {}
    compressed = 0
    module_names = dict(model.named_modules())
    for name, value in items:
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old GPT-2 checkpoints store their causal mask as a buffer
        if isinstance(value, EncodedTensor):
            owner = name.removesuffix(".weight")
            if owner not in module_names or not name.endswith(".weight"):
                raise ConfigError(f"compressed tensor {name!r} does not belong to a linear or embedding layer")
            if dtype is not None and value.dtype != dtype:
                raise ConfigError(
                    f"{name} is stored compressed as {value.dtype}; loading it as {dtype} would change its "
                    "bits. Load with dtype=None (as stored)."
                )
            if _is_conv1d(config, name):
                value = encode(decode(value).t().contiguous(), value.codec)
            _swap_in(model, owner, module_names[owner], value.to(device), cache, device)
            compressed += 1
            continue
        if _is_conv1d(config, name):
            value = value.t()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        plain[name] = value
    missing = _assign(model, plain, device)
    _tie(model, config, cache, device)
    missing = [m for m in missing if not _is_tied_head(config, m) and m not in _compressed_names(model)]
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    return compressed


def _compressed_names(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (CompressedLinear, CompressedEmbedding))}


def _is_tied_head(config: ModelConfig, name: str) -> bool:
    return config.tie_word_embeddings and name == "lm_head.weight"


def _swap_in(model, owner, module, encoded, cache, device) -> None:
    store = CompressedWeight(encoded, owner)
    if isinstance(module, nn.Embedding):
        new = CompressedEmbedding(store, cache, module.padding_idx, device)
    elif isinstance(module, nn.Linear):
        new = CompressedLinear(store, None, cache, device)
        if module.bias is not None:
            new.bias = module.bias  # filled below, from the plain tensors
    else:
        raise ConfigError(f"compressed tensor {owner}.weight belongs to a {type(module).__name__}")
    _set_submodule(model, owner, new)


def _assign(model: nn.Module, plain: dict[str, torch.Tensor], device) -> list[str]:
    """Put plain tensors in place of the meta parameters; return the names still missing."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in plain if n not in expected]
    if unknown:
        raise ConfigError(f"the checkpoint has tensors this model does not: {unknown[:3]}")
    for name, tensor in plain.items():
        param = expected[name]
        if tuple(param.shape) != tuple(tensor.shape):
            raise ConfigError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, nn.Parameter(tensor.to(device), requires_grad=False))
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]


def _tie(model: nn.Module, config: ModelConfig, cache: WeightCache, device) -> None:
    if not config.tie_word_embeddings:
        return
    embed = model.transformer.wte if config.arch == "gpt2" else model.model.embed_tokens
    if isinstance(embed, CompressedEmbedding):
        model.lm_head = CompressedLinear(embed.weight_store, None, cache, device)
    else:
        model.lm_head.weight = embed.weight
