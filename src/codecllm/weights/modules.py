"""CompressedLinear and CompressedEmbedding: drop-in twins of nn.Linear / nn.Embedding that hold
compressed bytes and ask their model's WeightCache for the decompressed weight at forward time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codecllm.codecs import EncodedTensor, encode
from codecllm.codecs.kernels_available import gemv_rows_fit
from codecllm.weights.cache import CompressedWeight, WeightCache
from codecllm.weights.offload import pin_packed


def serve_from(model: nn.Module, cache: WeightCache) -> None:
    """Point every compressed layer of `model` at `cache`."""
    for module in model.modules():
        if isinstance(module, _Compressed):
            module.cache = cache
            cache.register(module.weight_store)


class _Compressed(nn.Module):
    def __init__(self, store: CompressedWeight, cache: WeightCache, compute_device=None):
        super().__init__()
        self.weight_store = store  # modules sharing a weight (tied embeddings) share this
        self.cache = cache
        cache.register(store)
        self.compute_device = torch.device(compute_device) if compute_device is not None else store.encoded.device

    @property
    def encoded(self) -> EncodedTensor:
        return self.weight_store.encoded

    def decompressed_weight(self) -> torch.Tensor:
        return self.cache.get(self.weight_store, self.compute_device)

    def set_encoded(self, encoded: EncodedTensor) -> None:
        """Replace the weight (same shape and dtype) and drop its stale decompressed copy."""
        self.cache.invalidate(self.weight_store)
        if self.compute_device.type == "cuda" and self.encoded.device.type == "cpu":
            encoded = pin_packed(encoded.to("cpu"))  # stays in host RAM, as the weight it replaces
        self.weight_store.encoded = encoded

    @property
    def compressed_nbytes(self) -> int:
        return self.weight_store.compressed_nbytes

    def _fused_weight(self):
        """Under the `fused` policy, the nibble weight as the fused kernels take it (GEMV, row
        lookup); None where they do not run: another policy or codec, no Triton for the device,
        or a weight the kernel cannot take (decompressed through the cache instead)."""
        from codecllm.codecs.kernels_available import fused_gemv_possible

        if self.cache.policy.kind != "fused" or self.encoded.codec != "nibble":
            return None
        return self._fused_gemv() if fused_gemv_possible(self.compute_device) else None

    def _fused_gemv(self):
        """The nibble weight laid out for the fused GEMV, built once per weight; None when the
        kernel cannot take it (odd shapes, exponents near the top of the range)."""
        store = self.weight_store
        if getattr(store, "gemv_source", None) is not store.encoded:
            from codecllm.codecs.kernels.gemv import NibbleGemvWeight, nibble_gemv_supported

            encoded = store.encoded
            fits = nibble_gemv_supported(encoded) is None
            store.gemv = NibbleGemvWeight(encoded.to(self.compute_device)) if fits else None
            store.gemv_source = encoded
        return store.gemv


class CompressedLinear(_Compressed):
    """y = x Wᵀ + b with W held compressed. `in_features`/`out_features` as nn.Linear's."""

    def __init__(self, store: CompressedWeight, bias: torch.Tensor | None, cache: WeightCache,
                 compute_device=None):
        super().__init__(store, cache, compute_device)
        self.out_features, self.in_features = store.encoded.shape
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, codec: str, cache: WeightCache, name: str = "",
                    storage: str = "gpu") -> CompressedLinear:
        device = linear.weight.device
        encoded = _store(encode(linear.weight.data, codec), device, storage)
        bias = linear.bias.data if linear.bias is not None else None
        return cls(CompressedWeight(encoded, name), bias, cache, compute_device=device)

    override: torch.Tensor | None = None  # an adapted weight (expert vectors) used instead of the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.override is not None:
            return F.linear(x, self.override, self.bias)
        fused = self._fused_gemv_for(x)
        if fused is not None:
            self.cache.count_fused()
            y = fused(x)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.decompressed_weight(), self.bias)

    def _fused_gemv_for(self, x: torch.Tensor):
        """The fused GEMV for this input (bf16, at most 8 rows, no override), or None where it
        does not apply."""
        if self.override is not None or not gemv_rows_fit(x) or x.dtype != torch.bfloat16:
            return None
        return self._fused_weight()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, codec={self.encoded.codec}")


class CompressedEmbedding(_Compressed):
    def __init__(self, store: CompressedWeight, cache: WeightCache, padding_idx=None, compute_device=None):
        super().__init__(store, cache, compute_device)
        self.num_embeddings, self.embedding_dim = store.encoded.shape
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, codec: str, cache: WeightCache, name: str = "",
                       storage: str = "gpu") -> CompressedEmbedding:
        device = embedding.weight.device
        encoded = _store(encode(embedding.weight.data, codec), device, storage)
        return cls(CompressedWeight(encoded, name), cache, embedding.padding_idx, compute_device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        gather = self._fused_weight()
        if gather is not None:  # decode the looked-up rows only (padding_idx matters to training only)
            self.cache.count_fused()
            return gather.rows(ids)
        return F.embedding(ids, self.decompressed_weight(), self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, codec={self.encoded.codec}"


def _store(encoded: EncodedTensor, device: torch.device, storage: str) -> EncodedTensor:
    """Compressed bytes on the compute device ("gpu") or in host RAM ("cpu"; for a CUDA device
    pinned, in one block per weight, so each weight streams over in one copy)."""
    if storage == "cpu":
        return pin_packed(encoded) if device.type == "cuda" else encoded
    return encoded.to(device)
