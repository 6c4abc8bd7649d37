"""What every codec shares: the float bit layouts, the encoded container, the registry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from codecllm.errors import CodecError

BF16_SIGN_AND_MANTISSA = -0x7F81  # 0x807F as int16: bf16's sign bit and mantissa bits


def bf16_sign_mantissa(byte: torch.Tensor) -> torch.Tensor:
    """int16 bf16 bits, exponent field 0, of sign+mantissa bytes (sign << 7 | mantissa): times
    0x101 the byte stands in both halves, and the mask keeps bit 15 and bits 0-6."""
    return (byte.to(torch.int16) * 0x101) & BF16_SIGN_AND_MANTISSA


@dataclass(frozen=True)
class FloatLayout:
    """Bit layout of an IEEE-style float: sign | exponent | mantissa, most significant first.

    The codecs split each value into its exponent field (skewed, so worth coding) and the
    rest: sign and mantissa, `rest_bits` wide (close to uniform, so kept raw).
    """

    dtype: torch.dtype
    int_dtype: torch.dtype  # same width, for bit views
    exponent_bits: int
    mantissa_bits: int

    @property
    def total_bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def rest_bits(self) -> int:
        return 1 + self.mantissa_bits

    @property
    def rest_bytes(self) -> int:
        """Whole bytes of the rest kept as byte planes."""
        return self.rest_bits // 8

    @property
    def extra_bits(self) -> int:
        """Rest bits that do not fill a byte (fp16: 3); they travel in the bit stream."""
        return self.rest_bits % 8

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bits of a tensor of this dtype -> (exponent, rest) as int32 tensors."""
        bits = values.view(self.int_dtype).to(torch.int32)
        exponent = (bits >> self.mantissa_bits) & ((1 << self.exponent_bits) - 1)
        sign = (bits >> (self.total_bits - 1)) & 1
        rest = (sign << self.mantissa_bits) | (bits & ((1 << self.mantissa_bits) - 1))
        return exponent, rest

    def join(self, exponent: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """Inverse of `split`: integer (exponent, rest) -> a tensor of this dtype. In 16- and
        32-bit integers: 64-bit element-wise ops run several times slower on a CPU."""
        if self.total_bits == 16 and self.mantissa_bits == 7:  # bf16: rest is one byte, sign on top
            return (bf16_sign_mantissa(rest) | (exponent.to(torch.int16) << 7)).view(self.dtype)
        rest = rest.to(torch.int32)
        bits = (rest >> self.mantissa_bits) << (self.total_bits - 1)  # the sign (fp32: wraps to bit 31)
        bits |= exponent.to(torch.int32) << self.mantissa_bits
        bits |= rest & ((1 << self.mantissa_bits) - 1)
        return bits.to(self.int_dtype).view(self.dtype)


LAYOUTS: dict[torch.dtype, FloatLayout] = {
    torch.bfloat16: FloatLayout(torch.bfloat16, torch.int16, 8, 7),
    torch.float16: FloatLayout(torch.float16, torch.int16, 5, 10),
    torch.float32: FloatLayout(torch.float32, torch.int32, 8, 23),
}

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CodecError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class EncodedTensor:
    """A losslessly encoded tensor: named buffers plus small JSON-able metadata.

    `nbytes` counts everything needed to decode: every buffer and the metadata.
    """

    codec: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffers: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    tiles: int = 1
    # Validated, device-side pieces a decoder derives once (decode tables, widened indices), so
    # repeated decodes of the same tensor do no host work and no device synchronisation.
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # State that depends on the encoding alone, not on where its buffers live (a decode table per
    # device): shared by every copy of this encoding, so a copy made per use (host-RAM weights
    # streamed to the GPU) does not rebuild it.
    shared: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def original_nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        meta_bytes = len(json.dumps(self.meta, separators=(",", ":")))
        return sum(b.numel() * b.element_size() for b in self.buffers.values()) + meta_bytes

    @property
    def ratio(self) -> float:
        """Compressed size as a fraction of the original (0.67 means 67%)."""
        return self.nbytes / self.original_nbytes if self.original_nbytes else 1.0

    @property
    def device(self) -> torch.device:
        first = next(iter(self.buffers.values()), None)
        return first.device if first is not None else torch.device("cpu")

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> EncodedTensor:
        """The same encoding with its buffers on `device` (itself when they are there already)."""
        device = torch.device(device)
        if all(_same_device(v.device, device) for v in self.buffers.values()):
            return self
        return self.with_buffers({k: v.to(device, non_blocking=non_blocking) for k, v in self.buffers.items()})

    def with_buffers(self, buffers: dict[str, torch.Tensor]) -> EncodedTensor:
        """The same encoding over other copies of its buffers (same names, sizes and contents)."""
        return EncodedTensor(self.codec, self.dtype, self.shape, buffers, self.meta, self.tiles,
                             shared=self.shared)

    def __repr__(self) -> str:
        return (
            f"EncodedTensor(codec={self.codec!r}, dtype={dtype_name(self.dtype)}, "
            f"shape={self.shape}, nbytes={self.nbytes}, ratio={self.ratio:.4f}, tiles={self.tiles})"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda" or b.index is None:
        return True
    return a.index == b.index


class Codec:
    """A lossless codec. Subclasses set `name` and `dtypes` and implement the three methods.

    `decode_cpu` is the vectorised PyTorch reference; `decode_gpu` (optional) the Triton path.
    Both return a flat tensor of `encoded.dtype` with `encoded.numel` elements.
    """

    name: ClassVar[str]
    dtypes: ClassVar[tuple[torch.dtype, ...]] = tuple(LAYOUTS)
    has_gpu_decoder: ClassVar[bool] = False

    def encode(self, flat: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
        """Flat contiguous CPU tensor -> (buffers, meta, tiles)."""
        raise NotImplementedError

    def decode_cpu(self, encoded: EncodedTensor, verify: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def decode_gpu(self, encoded: EncodedTensor, verify: bool = True) -> torch.Tensor:
        raise NotImplementedError(f"codec {self.name!r} has no GPU decoder")


def buffer(encoded: EncodedTensor, name: str) -> torch.Tensor:
    """A named buffer, or a CodecError saying which one is missing."""
    try:
        return encoded.buffers[name]
    except KeyError:
        raise CodecError(
            f"{encoded.codec} data is missing its {name!r} buffer "
            f"(has: {', '.join(sorted(encoded.buffers)) or 'none'})"
        ) from None


def expect_size(encoded: EncodedTensor, name: str, numel: int) -> torch.Tensor:
    t = buffer(encoded, name)
    if t.numel() != numel:
        raise CodecError(
            f"{encoded.codec} buffer {name!r} holds {t.numel()} elements, expected {numel}: "
            "the encoded data is truncated or inconsistent"
        )
    return t
