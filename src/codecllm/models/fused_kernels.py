"""Triton kernels for the decode step's elementwise ops (see `fused.py` for when they run):
RMSNorm, residual add + RMSNorm, RoPE, SiLU(gate) * up, one kernel each.

Every kernel rounds exactly where the PyTorch code it replaces rounds (bf16 after each op, fp32
inside RMSNorm), with round-to-nearest-even done by integer ops and results stored as raw
bf16 bits. So RoPE and SiLU*up are bit-identical to the eager ops; RMSNorm differs only in the
order of its fp32 sum of squares. Imported only where they run: Triton is optional.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bf16_bits(v):
    """fp32 -> the bits of the nearest bf16 (ties to even; NaN -> 0x7FC0), as uint16 values in
    uint32, which is what torch's conversion gives. Integer ops only (exact in the interpreter)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, rounded)


@triton.jit
def _bf16_round(v):
    """fp32 -> fp32 holding the nearest bf16."""
    return (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _load_bf16(ptr, mask):
    """bf16 -> fp32 by a bit shift (exact; the interpreter's bf16 handling is not)."""
    raw = tl.load(ptr.to(tl.pointer_type(tl.uint16)), mask=mask, other=0).to(tl.uint32)
    return (raw << 16).to(tl.float32, bitcast=True)


@triton.jit
def _store_bf16(ptr, v, mask):
    tl.store(ptr.to(tl.pointer_type(tl.uint16)), _bf16_bits(v).to(tl.uint16), mask=mask)


@triton.jit
def _rms_norm_kernel(x, delta, weight, out, summed, D, eps, ADD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    v = _load_bf16(x + row + cols, ok)
    if ADD:  # the residual stream: x + delta, rounded to bf16 as the eager add does
        v = _bf16_round(v + _load_bf16(delta + row + cols, ok))
        _store_bf16(summed + row + cols, v, ok)
    scale = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps)
    normed = _bf16_round(v * scale)  # F.rms_norm in fp32, then .to(bf16)
    _store_bf16(out + row + cols, normed * _load_bf16(weight + cols, ok), ok)


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x.float()).to(bf16), over the last dimension."""
    rows = _rows_of(x)
    out = torch.empty_like(rows)
    d = rows.shape[1]
    _rms_norm_kernel[(rows.shape[0],)](rows, rows, weight, out, out, d, eps, ADD=False,
                                       BLOCK=triton.next_power_of_2(d), num_warps=_warps(d))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)) in one pass: the residual add and the next norm."""
    rows, delta_rows = _rows_of(x), _rows_of(delta)
    out, summed = torch.empty_like(rows), torch.empty_like(rows)
    d = rows.shape[1]
    _rms_norm_kernel[(rows.shape[0],)](rows, delta_rows, weight, out, summed, d, eps, ADD=True,
                                       BLOCK=triton.next_power_of_2(d), num_warps=_warps(d))
    return summed.view(x.shape), out.view(x.shape)


def _warps(d: int) -> int:
    return 8 if d >= 4096 else 4 if d >= 1024 else 1


@triton.jit
def _rope_kernel(x, cos, sin, out, H, T, stride_b, stride_h, stride_t, cs_stride_b,
                 D: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = pid % T
    h = (pid // T) % H
    b = pid // (T * H)
    src = x + b.to(tl.int64) * stride_b + h * stride_h + t * stride_t
    cols = tl.arange(0, HALF_BLOCK)
    first = _load_bf16(src + cols, cols < HALF)
    second = _load_bf16(src + HALF + cols, cols < HALF)
    table = b.to(tl.int64) * cs_stride_b + t * D
    dst = out + pid.to(tl.int64) * D
    # x * cos + rotate_half(x) * sin, rounded after each op as the eager bf16 code does
    c1, s1 = _load_bf16(cos + table + cols, cols < HALF), _load_bf16(sin + table + cols, cols < HALF)
    c2, s2 = _load_bf16(cos + table + HALF + cols, cols < HALF), _load_bf16(sin + table + HALF + cols, cols < HALF)
    _store_bf16(dst + cols, _bf16_round(first * c1) + _bf16_round(-second * s1), cols < HALF)
    _store_bf16(dst + HALF + cols, _bf16_round(second * c2) + _bf16_round(first * s2), cols < HALF)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), any strides with unit stride along D; cos, sin (B, 1, T, D) -> rotated x."""
    b, h, t, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(b, 1, t, d).contiguous(), sin.expand(b, 1, t, d).contiguous()
    out = torch.empty(b, h, t, d, dtype=x.dtype, device=x.device)
    _rope_kernel[(b * h * t,)](x, cos, sin, out, h, t, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                               D=d, HALF=d // 2, HALF_BLOCK=triton.next_power_of_2(d // 2), num_warps=1)
    return out


@triton.jit
def _silu_mul_kernel(gate, up, out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = _load_bf16(gate + i, ok)
    activated = _bf16_round(g / (1.0 + tl.exp(-g)))
    _store_bf16(out + i, activated * _load_bf16(up + i, ok), ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 1024
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4)
    return out
