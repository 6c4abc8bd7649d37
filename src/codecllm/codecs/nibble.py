"""`nibble`: bf16 with the exponent as a fixed 4-bit code.

The 15 most frequent consecutive exponents [base, base + 14] get codes 0..14; code 15 is an
escape whose true exponent is kept exactly in a side list (sorted element indices and their
exponent bytes). The sign+mantissa byte is kept raw. Size: 1.5 bytes per weight plus the
escapes, and every weight decodes on its own, which is what lets a GEMV decode in-register.

Buffers:
  sign_mantissa    uint8 [numel]             (sign << 7) | mantissa
  codes            uint8 [ceil(numel / 2)]   element 2i in the low nibble, 2i + 1 in the high
  escape_index     int32 or int64 [E]        sorted flat indices of escaped elements
  escape_exponent  uint8 [E]                 their exponent fields
"""

from __future__ import annotations

import torch

from codecllm.codecs.base import (
    BF16_SIGN_AND_MANTISSA,
    LAYOUTS,
    Codec,
    EncodedTensor,
    bf16_sign_mantissa,
    buffer,
    expect_size,
)
from codecllm.codecs.chunks import CHUNK, chunks, index_dtype
from codecllm.errors import CodecError

BF16 = LAYOUTS[torch.bfloat16]
ESCAPE = 15
TILE = 1 << 16  # elements; tiles are independent (every element is), this sets GPU work units


def choose_base(histogram: torch.Tensor) -> int:
    """Start of the window of 15 consecutive exponents that covers the most weights."""
    window = torch.nn.functional.conv1d(
        histogram.double().view(1, 1, -1), torch.ones(1, 1, ESCAPE, dtype=torch.float64)
    ).view(-1)
    return int(window.argmax())


class NibbleCodec(Codec):
    name = "nibble"
    dtypes = (torch.bfloat16,)
    has_gpu_decoder = True

    def encode(self, flat):
        numel = flat.numel()
        histogram = torch.zeros(256, dtype=torch.int64)
        for start, end in chunks(numel):
            exponent, _ = BF16.split(flat[start:end])
            histogram += torch.bincount(exponent, minlength=256)
        base = choose_base(histogram)

        sign_mantissa = torch.empty(numel, dtype=torch.uint8)
        codes = torch.empty((numel + 1) // 2, dtype=torch.uint8)
        escape_index, escape_exponent = [], []
        for start, end in chunks(numel):  # CHUNK is even: pairs never straddle chunks
            exponent, rest = BF16.split(flat[start:end])
            code = exponent - base
            escaped = (code < 0) | (code >= ESCAPE)
            code[escaped] = ESCAPE
            if code.numel() % 2:
                code = torch.cat([code, code.new_zeros(1)])
            pairs = code.view(-1, 2)
            codes[start // 2 : start // 2 + pairs.shape[0]] = (pairs[:, 0] | (pairs[:, 1] << 4)).to(
                torch.uint8
            )
            sign_mantissa[start:end] = rest.to(torch.uint8)
            where = escaped.nonzero().view(-1)
            escape_index.append(where + start)
            escape_exponent.append(exponent[where].to(torch.uint8))
        buffers = {
            "sign_mantissa": sign_mantissa,
            "codes": codes,
            "escape_index": torch.cat(escape_index).to(index_dtype(numel)) if numel else
            torch.empty(0, dtype=torch.int32),
            "escape_exponent": torch.cat(escape_exponent) if numel else torch.empty(0, dtype=torch.uint8),
        }
        return buffers, {"base": base}, max(1, -(-numel // TILE))

    @staticmethod
    def _parts(encoded: EncodedTensor):
        if "nibble" not in encoded.derived:
            encoded.derived["nibble"] = NibbleCodec._derive(encoded)
        return encoded.derived["nibble"]

    @staticmethod
    def _derive(encoded: EncodedTensor):
        numel = encoded.numel
        sign_mantissa = expect_size(encoded, "sign_mantissa", numel)
        codes = expect_size(encoded, "codes", (numel + 1) // 2)
        escape_index = buffer(encoded, "escape_index").long()
        escape_exponent = expect_size(encoded, "escape_exponent", escape_index.numel())
        base = encoded.meta.get("base")
        if not isinstance(base, int) or not 0 <= base <= 256 - ESCAPE:
            raise CodecError(f"nibble window base {base!r} is invalid (0..{256 - ESCAPE})")
        return sign_mantissa, codes, escape_index, escape_exponent, base

    @staticmethod
    def _check_escapes(encoded, codes, escape_index, escape_count) -> None:
        """Every code 15 must have exactly one entry in the side list, and vice versa."""
        numel = encoded.numel
        n = escape_index.numel()
        if n and (
            int(escape_index[0]) < 0
            or int(escape_index[-1]) >= numel
            or bool((escape_index[1:] <= escape_index[:-1]).any())
        ):
            raise CodecError("nibble escape indices are out of range or not sorted")
        if escape_count != n:
            raise CodecError(
                f"nibble data has {escape_count} escape codes but {n} escaped values: corrupted"
            )

    def decode_cpu(self, encoded: EncodedTensor, verify: bool = True) -> torch.Tensor:
        # int16 bits, a pair of weights per codes byte: a 256-entry table gives both exponent
        # fields as one int32 (element 2i in the low half), and sign + mantissa come from
        # bf16_sign_mantissa (int16 arithmetic, no per-element unpacking). 15-20x faster than
        # unpacking codes and joining fields in int64 (1.0-1.6 GB/s of bf16 on 2 cores).
        sign_mantissa, codes, escape_index, escape_exponent, base = self._parts(encoded)
        numel = encoded.numel
        byte = torch.arange(256, dtype=torch.int32)
        exponent_pairs = (((byte & 15) + base) << 7) | (((byte >> 4) + base) << 23)
        escapes_in_byte = ((byte & 15) == ESCAPE).long() + ((byte >> 4) == ESCAPE).long()
        out = torch.empty(codes.numel() * 2, dtype=torch.int16)
        escape_count = 0
        for start, end in chunks(codes.numel(), CHUNK // 2):
            packed = codes[start:end]
            escape_count += int(torch.bincount(packed, minlength=256) @ escapes_in_byte)
            bits = out[2 * start : 2 * end]
            torch.index_select(exponent_pairs, 0, packed.int(), out=bits.view(torch.int32))
            lo, hi = 2 * start, min(2 * end, numel)
            bits[: hi - lo] |= bf16_sign_mantissa(sign_mantissa[lo:hi])
        if numel % 2 and int(codes[-1]) >> 4 == ESCAPE:
            escape_count -= 1  # the padding nibble after the last element is not an element
        if verify:
            self._check_escapes(encoded, codes, escape_index, escape_count)
        out = out[:numel]
        if escape_index.numel():
            at = escape_index.clamp(0, numel - 1)  # checked above; unverified data must not crash
            out[at] = (out[at] & BF16_SIGN_AND_MANTISSA) | (escape_exponent.to(torch.int16) << 7)
        return out.view(torch.bfloat16)

    def decode_gpu(self, encoded: EncodedTensor, verify: bool = True) -> torch.Tensor:
        from codecllm.codecs.kernels.nibble_decode import nibble_decode

        sign_mantissa, codes, escape_index, escape_exponent, base = self._parts(encoded)
        if verify:
            packed = codes.to(torch.int32)
            escape_count = int(((packed & 15) == ESCAPE).sum() + ((packed >> 4) == ESCAPE).sum())
            self._check_escapes(encoded, codes, escape_index, escape_count)
        out = nibble_decode(sign_mantissa, codes, base, encoded.numel, escape_index, escape_exponent)
        return out
