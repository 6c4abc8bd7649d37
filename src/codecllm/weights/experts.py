"""Expert vectors (singular-value fine-tuning, seed 003): W = U diag(s) Vᵀ becomes U diag(s·z) Vᵀ.

`apply_expert_vectors(module, {linear_name: z})` replaces those layers' weights by the adapted
ones, leaving compressed base weights compressed (the adapted weight is held beside them and the
layer's decompressed cache entry is dropped); `None` restores the base exactly. Every change bumps
`module.weights_version`, so a KV/state cache built with the old weights is refused (versioned).
"""

from __future__ import annotations

import torch
from torch import nn

from codecllm.errors import CacheError, ConfigError
from codecllm.weights.modules import CompressedLinear


def weights_version(module: nn.Module) -> int:
    return getattr(module, "weights_version", 0)


def stamp(cache, module: nn.Module):
    """Record which weights a cache is computed with."""
    cache.weights_version = weights_version(module)
    return cache


def check_fresh(cache, module: nn.Module) -> None:
    """Raise if `cache` was computed with weights the model no longer has."""
    version = getattr(cache, "weights_version", None)
    if version is not None and version != weights_version(module):
        raise CacheError(
            f"this KV/state cache was computed with weights version {version}, but the model's weights "
            f"changed (now version {weights_version(module)}): start a new cache"
        )


def _base_weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, CompressedLinear):
        from codecllm.codecs import decode

        return decode(layer.encoded, layer.compute_device, verify=False)
    return layer.weight.data


def apply_expert_vectors(module: nn.Module, vectors: dict[str, torch.Tensor] | None) -> None:
    linears = {n: m for n, m in module.named_modules() if isinstance(m, (nn.Linear, CompressedLinear))}
    # Restore every adapted layer to its base first: the new set replaces the old one whole.
    for layer in linears.values():
        base = getattr(layer, "_expert_base", None)
        if base is not None:
            if isinstance(layer, CompressedLinear):
                layer.override = None
            else:
                layer.weight.data = base
            layer._expert_base = None
    for name, z in (vectors or {}).items():
        if name not in linears:
            raise ConfigError(f"no linear layer named {name!r}; see Model.named_modules()")
        layer = linears[name]
        weight = _base_weight(layer)
        rank = min(weight.shape)
        z = torch.as_tensor(z, dtype=torch.float32, device=weight.device).flatten()
        if z.numel() != rank:
            raise ConfigError(f"expert vector for {name!r} has {z.numel()} values; it needs min(in, out) = {rank}")
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        adapted = ((u * (s * z)) @ vh).to(weight.dtype)
        if isinstance(layer, CompressedLinear):
            layer._expert_base = True
            layer.override = adapted
            layer.cache.invalidate(layer.weight_store)
        else:
            layer._expert_base = layer.weight.data
            layer.weight.data = adapted
    module.weights_version = weights_version(module) + 1
