"""Triton GEMV for small batches (decode steps): y[b, n] = sum_k x[b, k] * W[n, k].

One kernel, two weight formats, so the comparison is like for like:
  * COMPRESSED=False: W is a plain bf16/fp16 (N, K) matrix: 2 bytes per weight.
  * COMPRESSED=True: W is `nibble` data decoded in registers: a sign+mantissa byte (N*K) and a
    4-bit exponent code (two per byte, N*K/2): 1.5 bytes per weight. Code 15 (escape) contributes
    0 in the main loop; the escaped weights are added exactly afterwards from a per-row list.

Each program owns BLOCK_N rows and walks K in BK-wide tiles with an fp32 accumulator per
(row, batch). The weight bits are turned into fp32 by bit operations only (bf16 is the top half
of fp32), which is exact and also what Triton's CPU interpreter gets right.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(
    x, weight, sign_mantissa, codes, escape_row_ptr, escape_col, escape_value, out,
    N, K, base, stride_xb, stride_ob,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, COMPRESSED: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # Columns are taken in pairs (2j, 2j+1): a code byte holds both their exponents, so the even
    # and odd halves are decoded and multiplied separately, with no register shuffles.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    batch = tl.arange(0, B_PAD)
    batch_ok = batch < B
    acc = tl.zeros((BLOCK_N, B_PAD), dtype=tl.float32)
    half_k = K // 2
    row_pairs = rows.to(tl.int64)[:, None] * half_k
    for j0 in range(0, half_k, BK // 2):
        pairs = j0 + tl.arange(0, BK // 2)
        ok = row_ok[:, None] & (pairs < half_k)[None, :]
        if COMPRESSED:
            rest = tl.load(sign_mantissa.to(tl.pointer_type(tl.int16)) + row_pairs + pairs[None, :],
                           mask=ok, other=0).to(tl.int32)
            packed = tl.load(codes + row_pairs + pairs[None, :], mask=ok, other=0).to(tl.int32)
            code_even, code_odd = packed & 15, (packed >> 4) & 15
            rest_even, rest_odd = rest & 0xFF, (rest >> 8) & 0xFF
            bits_even = ((rest_even & 0x80) << 24) | ((code_even + base) << 23) | ((rest_even & 0x7F) << 16)
            bits_odd = ((rest_odd & 0x80) << 24) | ((code_odd + base) << 23) | ((rest_odd & 0x7F) << 16)
            w_even = tl.where(code_even == 15, 0.0, bits_even.to(tl.float32, bitcast=True))
            w_odd = tl.where(code_odd == 15, 0.0, bits_odd.to(tl.float32, bitcast=True))
        else:
            even = weight + rows.to(tl.int64)[:, None] * K + 2 * pairs[None, :]
            w_even = tl.load(even, mask=ok, other=0).to(tl.float32)
            w_odd = tl.load(even + 1, mask=ok, other=0).to(tl.float32)
        if USE_DOT:  # batch > 1: tensor cores, (BLOCK_N, BK/2) x (BK/2, B_PAD) per half
            x_ok = (pairs < half_k)[:, None] & batch_ok[None, :]
            x_t = x + batch[None, :] * stride_xb + 2 * pairs[:, None]
            x_even = tl.load(x_t, mask=x_ok, other=0)
            x_odd = tl.load(x_t + 1, mask=x_ok, other=0)
            if DOT_FP32:  # Triton's CPU interpreter gets bf16 arithmetic wrong: stay in fp32 there
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            acc += tl.dot(w_even.to(x_even.dtype), x_even, input_precision="ieee")
            acc += tl.dot(w_odd.to(x_odd.dtype), x_odd, input_precision="ieee")
        else:
            x_ok = batch_ok[:, None] & (pairs < half_k)[None, :]
            x_even = tl.load(x + batch[:, None] * stride_xb + 2 * pairs[None, :], mask=x_ok, other=0).to(tl.float32)
            x_odd = tl.load(x + batch[:, None] * stride_xb + 2 * pairs[None, :] + 1, mask=x_ok, other=0).to(tl.float32)
            acc += tl.sum(w_even[:, None, :] * x_even[None, :, :] + w_odd[:, None, :] * x_odd[None, :, :], axis=2)
    if K % 2 == 1:  # the plain path takes odd K: its last column has no pair
        last = tl.load(weight + rows.to(tl.int64) * K + (K - 1), mask=row_ok, other=0).to(tl.float32)
        x_last = tl.load(x + batch * stride_xb + (K - 1), mask=batch_ok, other=0).to(tl.float32)
        acc += last[:, None] * x_last[None, :]
    if COMPRESSED:
        first = tl.load(escape_row_ptr + pid * BLOCK_N)
        last_escape = tl.load(escape_row_ptr + tl.minimum(pid * BLOCK_N + BLOCK_N, N))
        for e in range(first, last_escape):
            row = tl.load(escape_col + 2 * e)
            col = tl.load(escape_col + 2 * e + 1)
            value = tl.load(escape_value + e)
            xv = tl.load(x + batch * stride_xb + col, mask=batch_ok, other=0).to(tl.float32)
            acc += tl.where((rows == row)[:, None], value * xv[None, :], 0.0)
    tl.store(out + batch[None, :] * stride_ob + rows[:, None], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & batch_ok[None, :])


MAX_BATCH = 8


def _config(n: int, k: int, batch: int) -> tuple[int, int, int]:
    """(BLOCK_N, BK, num_warps), from the sweep in benchmarks/gemv.py on an H100."""
    if batch == 1:
        return 4, 1024, 2
    return 16, 256, 4  # tensor-core path


def _launch(x2d, n, k, out, weight=None, nibble=None, config=None):
    batch = x2d.shape[0]
    block_n, bk, warps = config or _config(n, k, batch)
    use_dot = batch > 1
    # tl.dot needs at least 16 rows and columns per operand; a single row needs no padding.
    b_pad = 16 if use_dot else 1
    if use_dot:
        block_n = max(block_n, 16)
        bk = max(bk, 32)
    dummy = x2d  # unused pointer slots still need a tensor
    if nibble is None:
        args = (weight, dummy, dummy, dummy, dummy, dummy, 0)
    else:
        sign_mantissa, codes, row_ptr, cols, values, base = nibble
        args = (dummy, sign_mantissa, codes, row_ptr, cols, values, base)
    grid = (triton.cdiv(n, block_n),)
    w, sm, cd, rp, ec, ev, base = args
    _gemv_kernel[grid](
        x2d, w, sm, cd, rp, ec, ev, out, n, k, base, x2d.stride(0), out.stride(0),
        B=batch, B_PAD=b_pad, BLOCK_N=block_n, BK=bk,
        COMPRESSED=nibble is not None, USE_DOT=use_dot, DOT_FP32=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=warps,
    )
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, config=None) -> torch.Tensor:
    """x (..., K) with at most MAX_BATCH rows, weight (N, K) -> (..., N)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    n, k = weight.shape
    out = torch.empty(x2d.shape[0], n, dtype=x.dtype, device=x.device)
    _launch(x2d, n, k, out, weight=weight.contiguous(), config=config)
    return out.view(*x.shape[:-1], n)


class NibbleGemvWeight:
    """A `nibble` EncodedTensor of shape (N, K), K even, laid out for the fused GEMV: the
    escapes regrouped by row (row pointer, (row, col) pairs, fp32 values)."""

    def __init__(self, encoded):
        from codecllm.codecs.nibble import NibbleCodec

        n, k = encoded.shape
        if k % 2:
            raise ValueError(f"the fused nibble GEMV needs an even in_features, got {k}")
        sign_mantissa, codes, escape_index, escape_exponent, base = NibbleCodec._parts(encoded)
        rows, cols = escape_index // k, escape_index % k
        rest = sign_mantissa[escape_index].to(torch.int32)
        bits = ((rest & 0x80) << 24) | (escape_exponent.to(torch.int32) << 23) | ((rest & 0x7F) << 16)
        self.shape = (n, k)
        self.sign_mantissa, self.codes, self.base = sign_mantissa, codes, base
        self.escape_values = bits.view(torch.float32)
        self.escape_pairs = torch.stack([rows, cols], dim=1).reshape(-1).contiguous()
        self.row_ptr = torch.searchsorted(rows, torch.arange(n + 1, device=rows.device)).to(torch.int64)

    def __call__(self, x: torch.Tensor, config=None) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        n, k = self.shape
        out = torch.empty(x2d.shape[0], n, dtype=x.dtype, device=x.device)
        nibble = (self.sign_mantissa, self.codes, self.row_ptr, self.escape_pairs, self.escape_values, self.base)
        _launch(x2d, n, k, out, nibble=nibble, config=config)
        return out.view(*x.shape[:-1], n)
