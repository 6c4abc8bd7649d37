"""bf16 <-> fp32 in Triton kernels by integer ops only.

They round exactly as torch does (nearest, ties to even; NaN -> 0x7FC0) and are exact in Triton's
CPU interpreter too, whose own bf16 conversions truncate and whose bf16 arithmetic is wrong.
Kernels that must match eager PyTorch bit for bit load, round and store through these.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_bits(v):
    """fp32 -> the bits of the nearest bf16, as uint16 values held in uint32."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, rounded)


@triton.jit
def bf16_round(v):
    """fp32 -> fp32 holding the nearest bf16."""
    return (bf16_bits(v) << 16).to(tl.float32, bitcast=True)


@triton.jit
def load_bf16(ptr, mask):
    """bf16 -> fp32 by a bit shift."""
    raw = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.uint32)
    return (raw << 16).to(tl.float32, bitcast=True)


@triton.jit
def store_bf16(ptr, v, mask):
    tl.store(ptr.to(tl.pointer_type(tl.uint16)), bf16_bits(v).to(tl.uint16), mask=mask)


@triton.jit
def silu_times(gate, up):
    """bf16(bf16(silu(gate)) * up) for bf16-valued fp32 inputs, rounded where F.silu(gate) * up
    rounds in bf16."""
    return bf16_round(bf16_round(gate / (1.0 + tl.exp(-gate))) * up)
