"""Triton kernel: decode `huffman` data (see codecs/huffman.py for the layout).

One program decodes LANES consecutive lanes; at each step every lane reads a 32-bit window at
its bit position (two aligned words), looks the codeword up in the table, emits one element and
advances. Outputs of one step are consecutive elements, so the stores coalesce. Every lane's
final bit position is written to `ends` so the caller can check it against the offsets.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codecllm.codecs.base import FloatLayout


@triton.jit
def _huffman_decode_kernel(
    rest, stream, offsets, table, out, ends, numel, lanes,
    STEPS: tl.constexpr, CODE_BITS: tl.constexpr, LANES: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, TOTAL_BITS: tl.constexpr,
    REST_BYTES: tl.constexpr, EXTRA_BITS: tl.constexpr,
):
    lane = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    live = lane < lanes
    position = tl.load(offsets + lane, mask=live, other=0).to(tl.int64)
    for step in range(STEPS):
        index = step * lanes + lane
        valid = live & (index < numel)
        word = position >> 5
        low = tl.load(stream + word, mask=valid, other=0).to(tl.int64) & 0xFFFFFFFF
        high = tl.load(stream + word + 1, mask=valid, other=0).to(tl.int64) & 0xFFFFFFFF
        window = (low | (high << 32)) >> (position & 31)
        entry = tl.load(table + (window & ((1 << CODE_BITS) - 1)), mask=valid, other=0)
        length = (entry >> 8).to(tl.int64)
        exponent = (entry & 0xFF).to(tl.int64)
        rest_value = ((window >> length) & ((1 << EXTRA_BITS) - 1)) << (8 * REST_BYTES)
        for plane in tl.static_range(REST_BYTES):
            byte = tl.load(rest + plane * numel + index, mask=valid, other=0).to(tl.int64)
            rest_value = rest_value | (byte << (8 * plane))
        sign = rest_value >> MANTISSA_BITS
        bits = (sign << (TOTAL_BITS - 1)) | (exponent << MANTISSA_BITS) | (rest_value & ((1 << MANTISSA_BITS) - 1))
        if TOTAL_BITS == 16:
            tl.store(out + index, bits.to(tl.int16), mask=valid)
        else:
            tl.store(out + index, bits.to(tl.int32), mask=valid)
        # An invalid peek (length 0) throws the lane far off, so its end check fails.
        position = tl.where(valid, position + length + EXTRA_BITS + (length == 0).to(tl.int64) * (1 << 40), position)
    tl.store(ends + lane, position, mask=live)


def huffman_decode(
    layout: FloatLayout, rest, stream, offsets, table, steps: int, code_bits: int, numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device = stream.device
    out = torch.empty(numel, dtype=layout.int_dtype, device=device)
    lanes = offsets.numel()
    ends = torch.empty(lanes, dtype=torch.int64, device=device)
    if numel:
        block = 128
        _huffman_decode_kernel[(triton.cdiv(lanes, block),)](
            rest, stream, offsets, table, out, ends, numel, lanes,
            STEPS=steps, CODE_BITS=code_bits, LANES=block,
            MANTISSA_BITS=layout.mantissa_bits, TOTAL_BITS=layout.total_bits,
            REST_BYTES=layout.rest_bytes, EXTRA_BITS=layout.extra_bits, num_warps=4,
        )
    return out.view(layout.dtype), ends
