"""Triton kernels: decode `nibble` data to bf16, then patch the escaped elements in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def nibble_bf16_bits(rest, exponent):
    """The bf16 bits (int32) of a sign+mantissa byte and an exponent field."""
    return ((rest & 0x80) << 8) | (exponent << 7) | (rest & 0x7F)


@triton.jit
def _nibble_decode_kernel(sign_mantissa, codes, out, numel, base, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    rest = tl.load(sign_mantissa + offsets, mask=mask, other=0).to(tl.int32)
    packed = tl.load(codes + (offsets >> 1), mask=mask, other=0).to(tl.int32)
    code = (packed >> ((offsets & 1) * 4).to(tl.int32)) & 15
    bits = nibble_bf16_bits(rest, code + base)
    tl.store(out + offsets, bits.to(tl.int16), mask=mask)


@triton.jit
def _patch_escapes_kernel(sign_mantissa, escape_index, escape_exponent, out, count, numel, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    index = tl.load(escape_index + i, mask=i < count, other=0).to(tl.int64)
    # an index outside the tensor (unverified, corrupted data) writes nothing, not past `out`
    mask = (i < count) & (index >= 0) & (index < numel)
    rest = tl.load(sign_mantissa + index, mask=mask, other=0).to(tl.int32)
    exponent = tl.load(escape_exponent + i, mask=mask, other=0).to(tl.int32)
    bits = nibble_bf16_bits(rest, exponent)
    tl.store(out + index, bits.to(tl.int16), mask=mask)


def nibble_decode(
    sign_mantissa: torch.Tensor,
    codes: torch.Tensor,
    base: int,
    numel: int,
    escape_index: torch.Tensor | None = None,
    escape_exponent: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.empty(numel, dtype=torch.int16, device=sign_mantissa.device)
    if numel:
        block = 2048
        _nibble_decode_kernel[(triton.cdiv(numel, block),)](
            sign_mantissa, codes, out, numel, base, BLOCK=block, num_warps=4
        )
    if escape_index is not None and escape_index.numel():
        count = escape_index.numel()
        _patch_escapes_kernel[(triton.cdiv(count, 1024),)](
            sign_mantissa, escape_index, escape_exponent, out, count, numel, BLOCK=1024, num_warps=4
        )
    return out.view(torch.bfloat16)
