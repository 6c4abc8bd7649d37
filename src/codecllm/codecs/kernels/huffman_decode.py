"""Triton kernel: decode `huffman` data (see codecs/huffman.py for the layout).

One program decodes LANES consecutive lanes. Each lane keeps a bit buffer in a register and
refills it with one aligned 32-bit word only when fewer than 16 bits are left (a codeword plus
its extra bits is at most 15), so most steps touch no stream memory at all: a masked load is
issued but only the lanes that need a word fetch one. Each step looks one codeword up in the
table, emits one element and consumes its bits. Outputs of one step are consecutive elements,
so their loads and stores coalesce. Every lane's final bit position goes to `ends` so the
caller can check it against the next lane's offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codecllm.codecs.base import FloatLayout


@triton.jit
def _huffman_decode_kernel(
    rest, stream, offsets, table, out, ends, numel, lanes, words,
    STEPS: tl.constexpr, CODE_BITS: tl.constexpr, LANES: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, TOTAL_BITS: tl.constexpr,
    REST_BYTES: tl.constexpr, EXTRA_BITS: tl.constexpr,
):
    lane = tl.program_id(0).to(tl.int64) * LANES + tl.arange(0, LANES)
    live = lane < lanes
    start = tl.load(offsets + lane, mask=live, other=0).to(tl.int64)
    word = start >> 5
    first = tl.load(stream + word, mask=live, other=0).to(tl.int64) & 0xFFFFFFFF
    buffer = first >> (start & 31)
    available = 32 - (start & 31)
    word += 1
    for step in range(STEPS):
        index = step * lanes + lane
        valid = live & (index < numel)
        need = valid & (available < 16) & (word < words)
        fresh = tl.load(stream + word, mask=need, other=0).to(tl.int64) & 0xFFFFFFFF
        buffer = tl.where(need, buffer | (fresh << available), buffer)
        available = tl.where(need, available + 32, available)
        word = tl.where(need, word + 1, word)
        entry = tl.load(table + (buffer & ((1 << CODE_BITS) - 1)), mask=valid, other=0)
        length = (entry >> 8).to(tl.int64)
        exponent = (entry & 0xFF).to(tl.int64)
        rest_value = ((buffer >> length) & ((1 << EXTRA_BITS) - 1)) << (8 * REST_BYTES)
        for plane in tl.static_range(REST_BYTES):
            byte = tl.load(rest + plane * numel + index, mask=valid, other=0).to(tl.int64)
            rest_value = rest_value | (byte << (8 * plane))
        sign = rest_value >> MANTISSA_BITS
        mantissa = rest_value & ((1 << MANTISSA_BITS) - 1)
        bits = (sign << (TOTAL_BITS - 1)) | (exponent << MANTISSA_BITS) | mantissa
        if TOTAL_BITS == 16:
            tl.store(out + index, bits.to(tl.int16), mask=valid)
        else:
            tl.store(out + index, bits.to(tl.int32), mask=valid)
        # An invalid peek (length 0) sends the lane far off, so its end check fails.
        used = tl.where(valid, length + EXTRA_BITS, 0)
        poison = tl.where(valid & (length == 0), 1 << 40, 0)
        buffer = buffer >> used
        available = available - used + poison
    tl.store(ends + lane, word * 32 - available, mask=live)


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
            rest, stream, offsets, table, out, ends, numel, lanes, stream.numel(),
            STEPS=steps, CODE_BITS=code_bits, LANES=block,
            MANTISSA_BITS=layout.mantissa_bits, TOTAL_BITS=layout.total_bits,
            REST_BYTES=layout.rest_bytes, EXTRA_BITS=layout.extra_bits, num_warps=4,
        )
    return out.view(layout.dtype), ends
