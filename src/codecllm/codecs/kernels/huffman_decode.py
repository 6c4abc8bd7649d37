"""Triton kernel: decode `huffman` data (see codecs/huffman.py for the layout).

One program decodes LANES consecutive lanes, one thread per lane, one symbol per lane per step.
Outputs of one step are consecutive elements, so the sign/mantissa loads and the stores
coalesce. Every lane's final bit position goes to `ends` (-1 after an invalid codeword) so the
caller can check it against the next lane's offset.

A lane's steps form a dependent chain, so latency bounds this loop, and on large tensors the L1
cache's cost per distinct cache line a warp touches does. The loop is laid out for both:
* Bit buffer: a lane holds 17..63 bits in a 64-bit register. When fewer than 32 remain after a
  step, it loads the next 32-bit word, and merges it one step later: the load flies while the
  next codeword is looked up, instead of in front of it.
* Two-level table: a 256-entry table decodes every codeword of up to 8 bits (nearly all), so a
  warp's 32 lookups touch a few cache lines; only lanes with a longer codeword read the full
  2**code_bits table.
* The sign/mantissa byte of a step is loaded AHEAD steps early, into registers rotated through
  an unrolled group of AHEAD steps (no step waits on DRAM for it).
* Before the loop, the program reads its lanes' whole stretch of the bit stream once, coalesced,
  so the refills hit L1 rather than going to DRAM one sector at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codecllm.codecs.base import FloatLayout
from codecllm.codecs.huffman import QUICK_BITS
from codecllm.codecs.kernels_available import sm_count

AHEAD = 8  # steps between loading a symbol's sign/mantissa byte and using it


@triton.jit
def _next_symbol(stream, table, buffer, available, word, fresh, pending, bad, words, valid,
                 CODE_BITS: tl.constexpr, QUICK_BITS: tl.constexpr, EXTRA_BITS: tl.constexpr):
    """One codeword from each valid lane (available >= 17 on entry and on return)."""
    quick = (buffer & ((1 << QUICK_BITS) - 1)).to(tl.int32)
    entry = tl.load(table + (1 << CODE_BITS) + quick, mask=valid, other=0).to(tl.int32)
    slow = valid & ((entry >> 8) == 0)
    peek = (buffer & ((1 << CODE_BITS) - 1)).to(tl.int32)
    entry = tl.where(slow, tl.load(table + peek, mask=slow, other=0).to(tl.int32), entry)
    length = entry >> 8
    extra = ((buffer >> length) & ((1 << EXTRA_BITS) - 1)).to(tl.int32)
    bad = bad | (valid & (length == 0))
    used = tl.where(valid, length + EXTRA_BITS, 0)
    buffer = buffer >> used
    available = available - used
    # merge the word loaded last step, then load the next one if fewer than 32 bits are left
    buffer = tl.where(pending, buffer | (fresh << available), buffer)
    available = tl.where(pending, available + 32, available)
    pending = valid & (available < 32) & (word < words)
    fresh = tl.load(stream + word, mask=pending, other=0).to(tl.int64) & 0xFFFFFFFF
    word = tl.where(pending, word + 1, word)
    return buffer, available, word, fresh, pending, bad, entry & 0xFF, extra


@triton.jit
def _huffman_decode_kernel(
    rest, stream, offsets, table, out, ends, numel, lanes, words, never,
    STEPS: tl.constexpr, CODE_BITS: tl.constexpr, QUICK_BITS: tl.constexpr, LANES: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, TOTAL_BITS: tl.constexpr,
    REST_BYTES: tl.constexpr, EXTRA_BITS: tl.constexpr,
    AHEAD: tl.constexpr, WARM: tl.constexpr, WIDE: tl.constexpr,
):
    tl.static_assert(AHEAD == 8, "the ring below holds 8 steps")
    pid = tl.program_id(0)
    if WIDE:  # element indices reach 2**31: 64-bit index arithmetic
        pid = pid.to(tl.int64)
    lane = pid * LANES + tl.arange(0, LANES)
    live = lane < lanes
    # Offsets outside the stream (corrupted data) are clamped into it: such a lane decodes
    # garbage and ends in the wrong place, which the end check reports; no load leaves the stream.
    last_bit = tl.cast(words, tl.int64) * 32 - 1
    start = tl.minimum(tl.maximum(tl.load(offsets + lane, mask=live, other=0).to(tl.int64), 0), last_bit)

    # Touch this program's stretch of the stream once, coalesced (WARM words at a time), so the
    # refills below find it in L1. The loads are kept by a store that `never` (0) disables.
    low = tl.minimum(tl.maximum(tl.load(offsets + pid * LANES).to(tl.int64), 0), last_bit) >> 5
    next_lane = (pid + 1) * LANES
    high = tl.load(offsets + next_lane, mask=next_lane < lanes, other=0).to(tl.int64) >> 5
    high = tl.minimum(tl.where(next_lane < lanes, high + 1, words), words)
    touched = tl.zeros([WARM], dtype=tl.int32)
    for first in range(low, high, WARM):
        at = first + tl.arange(0, WARM)
        touched ^= tl.load(stream + at, mask=at < high, other=0)
    tl.store(ends + tl.arange(0, WARM), touched.to(tl.int64), mask=tl.arange(0, WARM) < never)

    word = start >> 5
    buffer = (tl.load(stream + word, mask=live, other=0).to(tl.int64) & 0xFFFFFFFF) >> (start & 31)
    available = 32 - (start & 31).to(tl.int32)
    word += 1
    short = live & (available < 32) & (word < words)
    fresh = tl.load(stream + word, mask=short, other=0).to(tl.int64) & 0xFFFFFFFF
    buffer = tl.where(short, buffer | (fresh << available), buffer)
    available = tl.where(short, available + 32, available)
    word = tl.where(short, word + 1, word)
    pending = tl.zeros([LANES], dtype=tl.int1)
    bad = tl.zeros([LANES], dtype=tl.int1)

    # ring[k] holds plane 0 of step (group * AHEAD + k); rotated once per step, so after a group
    # of AHEAD unrolled steps it is in place again.
    ring = tl.load(rest + lane, mask=live & (lane < numel), other=0)
    r1 = tl.load(rest + lanes + lane, mask=live & (lanes + lane < numel), other=0)
    r2 = tl.load(rest + 2 * lanes + lane, mask=live & (2 * lanes + lane < numel), other=0)
    r3 = tl.load(rest + 3 * lanes + lane, mask=live & (3 * lanes + lane < numel), other=0)
    r4 = tl.load(rest + 4 * lanes + lane, mask=live & (4 * lanes + lane < numel), other=0)
    r5 = tl.load(rest + 5 * lanes + lane, mask=live & (5 * lanes + lane < numel), other=0)
    r6 = tl.load(rest + 6 * lanes + lane, mask=live & (6 * lanes + lane < numel), other=0)
    r7 = tl.load(rest + 7 * lanes + lane, mask=live & (7 * lanes + lane < numel), other=0)
    for group in range(tl.cdiv(STEPS, AHEAD)):
        for k in tl.static_range(AHEAD):
            index = (group * AHEAD + k) * lanes + lane
            valid = live & (index < numel)
            buffer, available, word, fresh, pending, bad, exponent, extra = _next_symbol(
                stream, table, buffer, available, word, fresh, pending, bad, words, valid,
                CODE_BITS, QUICK_BITS, EXTRA_BITS)
            later = index + AHEAD * lanes
            byte = ring
            ring, r1, r2, r3, r4, r5, r6 = r1, r2, r3, r4, r5, r6, r7
            r7 = tl.load(rest + later, mask=live & (later < numel), other=0)
            rest_value = (extra << (8 * REST_BYTES)) | byte.to(tl.int32)
            for plane in tl.static_range(1, REST_BYTES):
                upper = tl.load(rest + plane * numel + index, mask=valid, other=0).to(tl.int32)
                rest_value = rest_value | (upper << (8 * plane))
            sign = rest_value >> MANTISSA_BITS  # int32 throughout: fp32's sign shifts into bit 31
            mantissa = rest_value & ((1 << MANTISSA_BITS) - 1)
            bits = (sign << (TOTAL_BITS - 1)) | (exponent << MANTISSA_BITS) | mantissa
            if TOTAL_BITS == 16:
                tl.store(out + index, bits.to(tl.int16), mask=valid)
            else:
                tl.store(out + index, bits.to(tl.int32), mask=valid)
    position = tl.where(pending, word - 1, word) * 32 - available
    tl.store(ends + lane, tl.where(bad, -1, position), mask=live)


def lanes_per_program(lanes: int, device: torch.device) -> int:
    """256 lanes (8 warps) a program where that still gives every SM 1.5 programs or more:
    4-9% faster than 128 on large matrices (H100: 4096x4096 and up). Smaller ones are bound by
    the latency of their sequential steps, and more, smaller programs spread it over more SMs:
    128 lanes (4 warps) is 8-10% faster there."""
    if device.type == "cuda" and lanes >= 384 * sm_count(device):
        return 256
    return 128


def huffman_decode(
    layout: FloatLayout, rest, stream, offsets, table, steps: int, code_bits: int, numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device = stream.device
    out = torch.empty(numel, dtype=layout.int_dtype, device=device)
    lanes = offsets.numel()
    ends = torch.empty(lanes, dtype=torch.int64, device=device)
    if numel:
        block = lanes_per_program(lanes, device)
        _huffman_decode_kernel[(triton.cdiv(lanes, block),)](
            rest, stream, offsets, table, out, ends, numel, lanes, stream.numel(), 0,
            STEPS=steps, CODE_BITS=code_bits, QUICK_BITS=QUICK_BITS, LANES=block,
            MANTISSA_BITS=layout.mantissa_bits, TOTAL_BITS=layout.total_bits,
            REST_BYTES=layout.rest_bytes, EXTRA_BITS=layout.extra_bits,
            AHEAD=AHEAD, WARM=512, WIDE=numel + (AHEAD + 1) * lanes >= 2**31, num_warps=block // 32,
        )
    return out.view(layout.dtype), ends
