"""Lossless tensor codecs behind one registry.

    encoded = codecllm.encode(weight, codec="huffman")
    weight2 = codecllm.decode(encoded, device="cuda")   # bit-identical to `weight`
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

from codecllm.codecs.base import DTYPE_NAMES, LAYOUTS, Codec, EncodedTensor, dtype_name
from codecllm.codecs.huffman import HuffmanCodec
from codecllm.codecs.nibble import NibbleCodec
from codecllm.codecs.raw import RawCodec
from codecllm.codecs.zstd import ZstdCodec
from codecllm.devices import device_of
from codecllm.errors import CodecError

CODECS: dict[str, Codec] = {c.name: c for c in (HuffmanCodec(), NibbleCodec(), ZstdCodec(), RawCodec())}
BACKENDS = ("auto", "torch", "triton")

__all__ = [
    "CODECS",
    "EncodedTensor",
    "codecs_for",
    "decode",
    "encode",
    "get_codec",
    "gpu_available",
]


@cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def gpu_available() -> bool:
    """True when CUDA and Triton are both present, so GPU decoders run."""
    return torch.cuda.is_available() and triton_available()


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; choose one of: {', '.join(CODECS)}") from None


def codecs_for(dtype: torch.dtype) -> list[str]:
    """Names of the codecs that take `dtype`."""
    return [name for name, c in CODECS.items() if dtype in c.dtypes]


def check_dtype(codec: Codec, dtype: torch.dtype) -> None:
    if dtype not in LAYOUTS:
        raise CodecError(
            f"dtype {dtype_name(dtype)} is not supported by any codec; supported dtypes: "
            f"{', '.join(DTYPE_NAMES.values())}"
        )
    if dtype not in codec.dtypes:
        raise CodecError(
            f"codec {codec.name!r} does not take dtype {dtype_name(dtype)}; codecs that do: "
            f"{', '.join(codecs_for(dtype))}"
        )


def encode(tensor: torch.Tensor, codec: str = "huffman") -> EncodedTensor:
    """Losslessly encode a bf16/fp16/fp32 tensor of any shape (encoding runs on the CPU).

    Raises CodecError (a ValueError) for an unknown codec or a dtype the codec does not take.
    """
    impl = get_codec(codec)
    check_dtype(impl, tensor.dtype)
    flat = tensor.detach().to("cpu").contiguous().view(-1)
    buffers, meta, tiles = impl.encode(flat)
    return EncodedTensor(impl.name, tensor.dtype, tuple(tensor.shape), buffers, meta, tiles)


def decode(
    encoded: EncodedTensor,
    device: torch.device | str | None = None,
    *,
    verify: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Decode to a tensor bit-identical to the one encoded.

    device: where the result lives (default: where the encoded buffers are). On CUDA the
    Triton decoders run; `zstd` is a CPU codec, so it decodes on the CPU and copies.
    verify: check the internal consistency of the data (lane ends, escape counts); costs one
    device synchronisation on the GPU. backend: "auto", "torch" (the CPU reference) or
    "triton" (the GPU kernels, also under TRITON_INTERPRET=1 on the CPU).
    Raises CodecError when the data is inconsistent: it never returns wrong weights.
    """
    if backend not in BACKENDS:
        raise CodecError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    impl = get_codec(encoded.codec)
    check_dtype(impl, encoded.dtype)
    target = device_of(device) if device is not None else encoded.device
    use_triton = backend == "triton" or (
        backend == "auto" and target.type == "cuda" and impl.has_gpu_decoder
    )
    if use_triton:
        if not impl.has_gpu_decoder:
            raise CodecError(f"codec {impl.name!r} has no GPU decoder")
        if not triton_available():
            raise CodecError("the Triton decoders need the 'triton' package, which is not installed")
        if target.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
            raise CodecError("Triton decoding on the CPU needs TRITON_INTERPRET=1")
        flat = impl.decode_gpu(encoded.to(target), verify=verify)
    else:
        flat = impl.decode_cpu(encoded.to("cpu"), verify=verify).to(target)
    return flat.view(encoded.shape)
