"""compress_model: swap a model's nn.Linear / nn.Embedding modules for compressed twins, in place."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from codecllm.checkpoint import check_selects_some, matches_layers, parse_layer_spec
from codecllm.codecs import get_codec
from codecllm.errors import ConfigError
from codecllm.weights.cache import WeightCache
from codecllm.weights.modules import CompressedEmbedding, CompressedLinear

STORAGES = ("gpu", "cpu")


def _selected(name: str, selection) -> bool:
    return matches_layers(name + ".weight", selection)


def compress_model(model: nn.Module, codec: str = "huffman", layers: str | None = None, storage: str = "gpu",
                   cache: str | WeightCache = "auto", log: Callable[[str], None] | None = None) -> WeightCache:
    """Replace the model's nn.Linear and nn.Embedding modules with CompressedLinear /
    CompressedEmbedding, in place, and give the model one WeightCache (returned, and set as
    `model.weight_cache`). Works on any nn.Module, a `transformers` model included.

    layers: block ranges and name globs ('0-3,*lm_head*'), default every linear and embedding.
    storage: 'gpu' keeps compressed bytes on the weights' device, 'cpu' in (pinned) host RAM.
    Weights shared by several modules (tied embeddings) are compressed once.
    """
    if storage not in STORAGES:
        raise ConfigError(f"storage {storage!r} is not valid; choose one of: {', '.join(STORAGES)}")
    get_codec(codec)
    selection = parse_layer_spec(layers)
    weight_cache = cache if isinstance(cache, WeightCache) else WeightCache(cache, log=log)
    shared: dict[int, nn.Module] = {}
    replacements = []
    layer_names = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    check_selects_some(layers, selection, [name + ".weight" for name in layer_names])
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)) or not _selected(name, selection):
            continue
        if module.weight.dtype not in get_codec(codec).dtypes:
            continue
        replacements.append((name, module))
    for name, module in replacements:
        key = module.weight.data_ptr()
        if key in shared:
            store, device = shared[key].weight_store, module.weight.device
            if isinstance(module, nn.Linear):
                new = CompressedLinear(store, _bias(module), weight_cache, device)
            else:
                new = CompressedEmbedding(store, weight_cache, module.padding_idx, device)
        elif isinstance(module, nn.Linear):
            new = CompressedLinear.from_linear(module, codec, weight_cache, name, storage)
        else:
            new = CompressedEmbedding.from_embedding(module, codec, weight_cache, name, storage)
        shared.setdefault(key, new)
        _set_submodule(model, name, new)
    attach_weight_cache(model, weight_cache)
    return weight_cache


def attach_weight_cache(model: nn.Module, weight_cache: WeightCache) -> None:
    """Give `model` its cache, and a forward pre-hook (registered once) that counts passes."""
    model.weight_cache = weight_cache
    if not getattr(model, "_codecllm_pass_hook", None):
        model._codecllm_pass_hook = model.register_forward_pre_hook(lambda *_: model.weight_cache.begin_pass())


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return linear.bias.data if linear.bias is not None else None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
