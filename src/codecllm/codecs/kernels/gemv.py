"""Triton GEMV for small batches (decode steps): y[b, n] = sum_k x[b, k] * W[n, k].

Two kernels of one structure, so the comparison is like for like:
  * `_plain_kernel`: W is a plain bf16/fp16/fp32 (N, K) matrix (2 bytes per bf16 weight).
  * `_nibble_kernel`: W is `nibble` data decoded in registers: a sign+mantissa byte (N*K)
    and a 4-bit exponent code (two per byte, N*K/2): 1.5 bytes per weight.

Each program owns BLOCK_N rows and walks K in BK-wide tiles, keeping one fp32 partial sum per
row and column slot, reduced once at the end: a reduction per tile would cost a cross-warp
exchange and a barrier every iteration. Batches of 2-8 run on tensor cores: the plain kernel
through `tl.dot`, the nibble kernel decoding straight into the MMA's operand registers
(`_nibble_rows_dot`: no shared memory in its loop, loads a loop turn ahead); small matrices at
batches 2-4 stay on CUDA cores, a few rows a program, each weight read once for the batch
(latency-bound there, they fill the GPU with programs sooner). Both nibble loops load their
first turn's weights before they wait for the kernel that writes x (PDL). On tensor cores a
program holds at least 16 rows, so a matrix of few rows leaves SMs idle: there K is split in
spans (a second grid axis), each span's fp32 sums go to a workspace, and the last span of a row
block to finish adds them in split order (the same result on every run, unlike atomic adds).

The nibble decode is integer-bound, so it works on 32-bit words: one load brings the
sign+mantissa bytes of 4 consecutive weights, a 16-bit load their 4 codes, and eight
instructions make them two bf16 pairs (`_bf16_pairs`: byte permutes, two multiply-adds place the
codes, one lop3 a pair selects; on CUDA cores a shift or a mask then widens each half to fp32,
on tensor cores the pairs are the MMA operand). The interpreter runs no PTX and takes the same
decode in integer arithmetic; the GPU tests compare the two bit for bit. Escaped weights
(code 15) are not special-cased in the loop: the loop computes a known wrong value for them
(code 15 read as exponent base + 15); afterwards the product with that value is taken out and
the true one put in, from values computed exactly on the host and grouped by 16-row tile
(`EscapeTable`; fp32 sums at batch 1, two small MMAs on tensor cores). So the main loop has no
compare and no select.
The weight bits become fp32 by bit operations only, which is exact and also what Triton's CPU
interpreter gets right.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codecllm.codecs.kernels import pdl
from codecllm.codecs.kernels.arrivals import arrival_counters, last_to_arrive
from codecllm.codecs.kernels.bf16 import bf16_round, silu_times, store_bf16
from codecllm.codecs.kernels.nibble_decode import nibble_bf16_bits
from codecllm.codecs.kernels.pdl import launch_next, wait_for_inputs
from codecllm.codecs.kernels_available import GEMV_MAX_ROWS, hopper_or_later, interpreting

try:  # host-side tensor descriptors (Triton >= 3.4): the tiles of _nibble_tma_kernel
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the register kernel everywhere
    TensorDescriptor = None

MAX_BATCH = GEMV_MAX_ROWS
ESCAPE = 15
ESCAPE_TILE = 16  # rows a tensor-core program takes, and rows per tile of its escape table
# PDL: a nibble launch on tensor cores (batches 2-8) of this many weights or more lets the next
# kernel launch after its loops, not right after its wait (see _nibble_kernel)
LATE_TRIGGER_WEIGHTS = 1 << 24
# PDL: a nibble gate/up launch on CUDA cores (batch 1) of fewer weights than this lets the next
# kernel (down) launch right after its wait, larger ones after their loops (see _nibble_kernel)
EARLY_GATED_WEIGHTS = 1 << 25
# nibble weights decoded by PTX byte permutes on NVIDIA GPUs (_bf16_pairs); the GPU tests switch
# it off to compare the bits with the integer decode, the one the interpreter (and ROCm) runs
PTX_DECODE = True
# nibble launches of many weights at batches 2-8 bring their tiles into shared memory by TMA
# (_nibble_tma_kernel, _tma_warps); off, they take the register kernel (_nibble_rows_dot)
TMA_LOADS = True
TMA_STAGES = 3  # tiles in flight a program: 3 beat 2 and 4 on every shape timed (session 26)
TMA_MIN_WEIGHTS = 1 << 23  # single matrices of fewer weights keep the register kernel (_tma_warps)


@triton.jit
def _wait_for_x(PDL: tl.constexpr, LATE: tl.constexpr):
    """PDL: wait for the kernel that wrote x, then let the next kernel launch, unless LATE (the
    launch then lets it go in _emit, after its loops)."""
    wait_for_inputs(PDL)
    if not LATE:
        launch_next(PDL)


@triton.jit
def _base2(base):
    """A matrix's exponent window base in both bf16 halves of a word, as _bf16_pairs adds it."""
    return (base << 7) | (base << 23)


@triton.jit
def _bf16_at(words, J: tl.constexpr):
    """fp32 value of bf16 number J (0..3) of each 64-bit word."""
    return ((words >> (16 * J)).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _tile_escapes(escapes, slots, tile, N, SLOTS: tl.constexpr):
    """Reads of an EscapeTable (`escapes`, `slots` a tile) for 16-row tile `tile` of an N-row
    matrix: its slots (SLOTS entries, 0 past `slots`), then where the escapes beyond them lie:
    the start of the overflow entries and the tile's range in them, for _extra_escapes."""
    slot = tl.arange(0, SLOTS)
    entries = tl.load(escapes + tile * slots + slot, mask=slot < slots, other=0)
    tiles = tl.cdiv(N, 16)
    pointer = escapes + tiles * slots  # row pointer over tiles of the overflow entries
    return entries, pointer + tiles + 1, tl.load(pointer + tile), tl.load(pointer + tile + 1)


@triton.jit
def _extra_escapes(extra, e0, last, SLOTS: tl.constexpr):
    """Overflow entries e0.. of a tile (0 from `last` on), SLOTS at a time."""
    e = e0 + tl.arange(0, SLOTS)
    return tl.load(extra + e, mask=e < last, other=0)


@triton.jit
def _entry_fields(packed):
    """An EscapeTable entry's column, row in its tile, and its two bf16 patterns (low half: the
    loop's value negated, high half: the true value; 0 for an empty slot)."""
    where = packed.to(tl.int32)
    return where >> 4, where & 15, (packed >> 32).to(tl.int32)


@triton.jit
def _row_loads(word_ptr, code_ptr, row_words, w, row_ok, words_per_row, EVEN: tl.constexpr):
    """One turn of _nibble_rows' weight loads at words `w` of each row: sign+mantissa words, codes."""
    if EVEN:
        packed = tl.load(word_ptr + row_words + w)
        packed_codes = tl.load(code_ptr + row_words + w)
    else:
        ok = row_ok[:, None, None] & (w < words_per_row)
        packed = tl.load(word_ptr + row_words + w, mask=ok, other=0)
        packed_codes = tl.load(code_ptr + row_words + w, mask=ok, other=0)
    return packed, packed_codes


@triton.jit
def _row_x(x_rows, w, batch_ok, words_per_row, EVEN: tl.constexpr):
    """x for one turn of _nibble_rows: 64-bit words (4 bf16) at words `w` of each row of the batch."""
    ok = batch_ok[:, None, None, None]
    if not EVEN:
        ok = ok & (w < words_per_row)[None]
    return tl.load(x_rows + w[None], mask=ok, other=0)


@triton.jit
def _row_fmas(acc4, packed, packed_codes, xw, base2, PTX: tl.constexpr):
    """acc4 plus one turn of _nibble_rows: the words' weights as bf16 pairs (w0, w2), (w1, w3), each
    half widened to fp32 by a shift or mask, times x."""
    even, odd = _bf16_pairs(packed, packed_codes.to(tl.int32), base2, PTX)
    acc4 += (even << 16).to(tl.float32, bitcast=True)[None] * _bf16_at(xw, 0)
    acc4 += (odd << 16).to(tl.float32, bitcast=True)[None] * _bf16_at(xw, 1)
    acc4 += (even & -65536).to(tl.float32, bitcast=True)[None] * _bf16_at(xw, 2)
    acc4 += (odd & -65536).to(tl.float32, bitcast=True)[None] * _bf16_at(xw, 3)
    return acc4


@triton.jit
def _nibble_rows(
    x, sign_mantissa, codes, escapes, slots, sm1, codes1, et1, es1, base1, pid,
    N, words_per_row, base, stride_xw, stride_xb,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
    SLOTS: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr, WAIT: tl.constexpr, LATE: tl.constexpr,
    PAIR: tl.constexpr,
):
    """fp32 (B_PAD, BLOCK_N): rows pid * BLOCK_N... of one nibble matrix times x, twice (the same
    sums), or with PAIR those of two matrices of one shape (sign_mantissa..., sm1...: gate and up).
    BLOCK_N divides ESCAPE_TILE: a program's rows lie in one tile of the escape table.

    WAIT: the program waits for the kernel before (PDL) here, after it has issued its first turn's
    weight loads, as _nibble_rows_dot does: with PDL the next launch's programs are placed while
    the last programs of this one run, and their first loads then fill that tail. On an H100 at
    batch 1 (one process, timed alternately) tinyllama's four launches of a layer took 35.3 ->
    34.1 us and the 8B's 120.9 -> 118.9. Loading every turn a turn ahead as well lost (35.6 /
    120.5: more registers, fewer programs an SM).

    PAIR: gate and up share the loop (x loaded and widened once; both matrices' loads in flight
    together) instead of one loop after the other. H100, batch 1, tinyllama's four launches of a
    layer chained under PDL (session 20, escape terms then summed before the loop): gate/up 15.1
    -> 14.9 us with PAIR; PAIR without that escape order lost (17.9).

    Escapes: x at the escapes' columns is gathered right after the wait, and the escape terms are
    summed after the loop, so the gather's L2 round trip overlaps the loop instead of ending the
    program (summing the terms before the loop, as session 20 did, made the loop wait for the
    gather: its shuffles came first). At batch 1, x's own loads are issued before the gather,
    whose address waits on the escape table; with PAIR, a program whose rows have no escape in
    their tile's slots (most of them: ~0.3 escapes a 2048-weight row) skips the gather and the
    sums behind a branch, which is also what keeps x's loads ahead of the gather there. The same
    operations as before, so the same bits. H100, each launch alone (session 23, 5 rounds in
    turn): batch 1, tinyllama gate/up 14.65 -> 13.70 us, o 3.78 -> 3.52, q/k/v 4.37 -> 4.27, down
    7.37 -> 7.11, lm_head 35.9 -> 35.8, the 8B's gate/up 62.5 -> 62.8; batch 2, o 4.43 -> 4.19.
    In the decode step the gain mostly goes: profiled per kernel at batch 1, tinyllama's gate/up
    took 13.35 -> 13.22 us (its weights load before its PDL wait there, behind the RMSNorm), and
    the step was level, as were both models end to end. The branch without PAIR lost alone (o
    3.74, down 7.99: one wave, whose slowest program sets the time)."""
    # words_per_row = K / 4 comes in as an argument, not computed here: Triton then knows its
    # divisibility (it specialises arguments divisible by 16), which is what lets it issue
    # 16-byte loads. EVEN: every tile is full (N % BLOCK_N == 0, K % BK == 0): no masks.
    # Batches use the same loop with a batch dimension where _config keeps them on CUDA cores
    # (small matrices, batches 2-4): each weight is decoded once and used in B FMAs; other
    # batches take _nibble_rows_dot.
    BW: tl.constexpr = BK // 4  # 32-bit words of sign+mantissa bytes per tile row
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    batch = tl.arange(0, B_PAD)
    batch_ok = batch < B
    word_ptr = sign_mantissa.to(tl.pointer_type(tl.int32))
    code_ptr = codes.to(tl.pointer_type(tl.uint16))
    base2 = _base2(base)
    # Tiles are (rows, BW/2, 2) words, and x is read as 64-bit words (4 bf16, the inputs of one
    # weight word): Triton then gives the weight words, their codes and the x words the same
    # layout (2 consecutive elements per thread) and needs no shared-memory shuffle between them,
    # which it does for any shape where the vector widths differ.
    in_tile = (tl.arange(0, BW // 2)[:, None] * 2 + tl.arange(0, 2)[None, :])[None, :, :]
    row_words = rows.to(tl.int64)[:, None, None] * words_per_row
    # stride_xw: x's row stride in 64-bit words, an argument for the same reason as words_per_row
    x_rows = x.to(tl.pointer_type(tl.uint64)) + (batch.to(tl.int64) * stride_xw)[:, None, None, None]
    # the tile's escapes: issued before the wait, used after it (x's gather) and after the loop
    tile_escapes, extra, first_extra, last_extra = _tile_escapes(escapes, slots, pid * BLOCK_N // 16, N, SLOTS)
    acc4 = tl.zeros((B_PAD, BLOCK_N, BW // 2, 2), dtype=tl.float32)
    packed, packed_codes = _row_loads(word_ptr, code_ptr, row_words, in_tile, row_ok, words_per_row, EVEN)
    if PAIR:
        up_word_ptr = sm1.to(tl.pointer_type(tl.int32))
        up_code_ptr = codes1.to(tl.pointer_type(tl.uint16))
        up_base2 = _base2(base1)
        up_escapes, up_extra, up_first, up_last = _tile_escapes(et1, es1, pid * BLOCK_N // 16, N, SLOTS)
        up4 = tl.zeros((B_PAD, BLOCK_N, BW // 2, 2), dtype=tl.float32)
        up_packed, up_codes = _row_loads(up_word_ptr, up_code_ptr, row_words, in_tile, row_ok, words_per_row, EVEN)
    if WAIT:
        _wait_for_x(PDL, LATE)
    if B == 1:
        xw = _row_x(x_rows, in_tile, batch_ok, words_per_row, EVEN)
    if PAIR:  # gather the escapes' x only where these rows have escapes
        found, xs = _escape_x_if_any(x, tile_escapes, rows, stride_xb, B, B_PAD, SLOTS)
        up_found, up_xs = _escape_x_if_any(x, up_escapes, rows, stride_xb, B, B_PAD, SLOTS)
    else:
        xs = _escape_x(x, tile_escapes, rows, stride_xb, B, B_PAD)
    if B > 1:
        xw = _row_x(x_rows, in_tile, batch_ok, words_per_row, EVEN)
    acc4 = _row_fmas(acc4, packed, packed_codes, xw, base2, PTX)
    if PAIR:
        up4 = _row_fmas(up4, up_packed, up_codes, xw, up_base2, PTX)
    for w0 in range(BW, words_per_row, BW):
        w = w0 + in_tile
        packed, packed_codes = _row_loads(word_ptr, code_ptr, row_words, w, row_ok, words_per_row, EVEN)
        if PAIR:
            up_packed, up_codes = _row_loads(up_word_ptr, up_code_ptr, row_words, w, row_ok, words_per_row, EVEN)
        xw = _row_x(x_rows, w, batch_ok, words_per_row, EVEN)
        acc4 = _row_fmas(acc4, packed, packed_codes, xw, base2, PTX)
        if PAIR:
            up4 = _row_fmas(up4, up_packed, up_codes, xw, up_base2, PTX)
    # the escape terms, here rather than in _row_sums: so Triton 3.6 gives gate/up 80 registers,
    # not 124 (12 programs an SM, not 8)
    if PAIR:
        taken_out, put_in = _escape_terms_if(found, xs, tile_escapes, rows, B_PAD, BLOCK_N)
        up_taken_out, up_put_in = _escape_terms_if(up_found, up_xs, up_escapes, rows, B_PAD, BLOCK_N)
    else:
        taken_out, put_in = _escape_terms(xs, tile_escapes, rows)
    acc = _row_sums(acc4, taken_out, put_in, x, extra, first_extra, last_extra, rows, stride_xb, B, B_PAD, SLOTS)
    up = acc
    if PAIR:
        up = _row_sums(up4, up_taken_out, up_put_in, x, up_extra, up_first, up_last, rows, stride_xb, B, B_PAD,
                       SLOTS)
    return acc, up


@triton.jit
def _row_sums(acc4, taken_out, put_in, x, extra, first_extra, last_extra, rows, stride_xb, B: tl.constexpr,
              B_PAD: tl.constexpr, SLOTS: tl.constexpr):
    """_nibble_rows' result (B_PAD, R): its loop's sums acc4, plus the escape terms of its tile's
    slots (_escape_terms), then the escapes beyond the slots (_escape_sums)."""
    acc = tl.sum(tl.sum(acc4, axis=3), axis=2)
    acc = acc + taken_out + put_in
    for e0 in range(first_extra, last_extra, SLOTS):  # rare: more escapes than slots
        acc = _escape_sums(acc, x, _extra_escapes(extra, e0, last_extra, SLOTS), rows, stride_xb, B, B_PAD)
    return acc


@triton.jit
def _mine(packed, rows):
    """(R, SLOTS): which escapes of a tile (EscapeTable entries, 0 for an empty slot) lie in `rows`."""
    _, row, values = _entry_fields(packed)
    return (values != 0)[None, :] & (row[None, :] == (rows % 16)[:, None])


@triton.jit
def _has_escapes(packed, rows):
    """Whether any of `rows` has an escape among its tile's entries `packed`."""
    return tl.max(tl.max(_mine(packed, rows).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _escape_x(x, packed, rows, stride_xb, B: tl.constexpr, B_PAD: tl.constexpr):
    """(B_PAD, SLOTS) bf16: x at the columns of the escapes (`packed`) that lie in `rows`, 0 at
    the others: a program with none loads nothing."""
    col, _, _ = _entry_fields(packed)
    ours = tl.max(_mine(packed, rows).to(tl.int32), axis=0) > 0
    batch = tl.arange(0, B_PAD)
    return tl.load(x + batch[:, None] * stride_xb + col[None, :], mask=(batch < B)[:, None] & ours[None, :], other=0)


@triton.jit
def _escape_terms(xs, packed, rows):
    """_escape_sums' two terms (B_PAD, R) from xs (_escape_x): x times the escapes' loop values
    taken out, and x times their true values."""
    _, _, values = _entry_fields(packed)
    mine = _mine(packed, rows)
    xs = xs.to(tl.float32)[:, None, :]
    taken_out = (values << 16).to(tl.float32, bitcast=True)[None, None, :]
    put_in = (values & -65536).to(tl.float32, bitcast=True)[None, None, :]
    out_terms = tl.sum(tl.where(mine[None], xs * taken_out, 0.0), axis=2)
    in_terms = tl.sum(tl.where(mine[None], xs * put_in, 0.0), axis=2)
    return out_terms, in_terms


@triton.jit
def _escape_x_if_any(x, packed, rows, stride_xb, B: tl.constexpr, B_PAD: tl.constexpr, SLOTS: tl.constexpr):
    """(whether any of `rows` has an escape in `packed`, _escape_x): the gather behind a branch,
    zeros where there is none."""
    found = _has_escapes(packed, rows)
    xs = tl.zeros((B_PAD, SLOTS), dtype=x.dtype.element_ty)
    if found:
        xs = _escape_x(x, packed, rows, stride_xb, B, B_PAD)
    return found, xs


@triton.jit
def _escape_terms_if(found, xs, packed, rows, B_PAD: tl.constexpr, R: tl.constexpr):
    """_escape_terms where `found` (_escape_x_if_any), zeros otherwise."""
    taken_out = tl.zeros((B_PAD, R), dtype=tl.float32)
    put_in = tl.zeros((B_PAD, R), dtype=tl.float32)
    if found:
        taken_out, put_in = _escape_terms(xs, packed, rows)
    return taken_out, put_in


@triton.jit
def _escape_sums(acc, x, packed, rows, stride_xb, B: tl.constexpr, B_PAD: tl.constexpr):
    """acc (B_PAD, R) for `rows` (R rows of one tile) with the escapes `packed` (EscapeTable
    entries of their tile, 0 for none) corrected on CUDA cores: x times each's loop value taken
    out, then x times its true value put in: (true - loop) * x in one step would round a tiny
    escaped weight away next to the loop's much larger value (and so would, with split K, a
    correction in another split than the one whose sum holds the loop's product). Each product
    of two bf16 values is exact in fp32."""
    taken_out, put_in = _escape_terms(_escape_x(x, packed, rows, stride_xb, B, B_PAD), packed, rows)
    return acc + taken_out + put_in


# _bf16_pairs in PTX: $0, $1 = the (w0, w2), (w1, w3) pairs of word $2 with codes $3, base2 $4
_PAIRS_PTX = tl.constexpr("""{
    .reg .b32 e, o, ce, co;
    prmt.b32 e, $2, 0, 0x2200;
    prmt.b32 o, $2, 0, 0x3311;
    and.b32 ce, $3, 0x0F0F;
    and.b32 co, $3, 0xF0F0;
    mad.lo.u32 ce, ce, 0x8080, $4;
    mad.lo.u32 co, co, 0x808, $4;
    lop3.b32 $0, e, ce, 0x807F807F, 0xE4;
    lop3.b32 $1, o, co, 0x807F807F, 0xE4;
}""")


@triton.jit
def _bf16_pairs(words, codes, base2, PTX: tl.constexpr):
    """The four weights of each 32-bit word of sign+mantissa bytes (b0..b3; `codes` holds their
    exponent codes c0..c3 in bits 0-3, 4-7, 8-11, 12-15) as two bf16x2 words, (w0, w2) and (w1, w3),
    low half first; base2 = base << 7 | base << 23.
    Each byte is copied into both bytes of its half: [b0, b0, b2, b2] has w0's sign at bit 15 and
    mantissa at bits 0-6, w2's at 31 and 16-22. (codes & 0x0F0F) * 0x8080 puts c0 at bits 7-10 and
    c2 at 23-26 (its other copies land in bits 15-19, which the select takes from the bytes); adding
    base2 there makes the exponents (code + base < 255: no carry leaves its field).
    PTX: the same in eight instructions a word, byte permutes (prmt) for the copies and one lop3 a
    pair for the select; the interpreter runs no PTX, so it checks the integer form, which the GPU
    tests compare with this one bit for bit."""
    SIGN_MANTISSA: tl.constexpr = -0x7F807F81  # 0x807F807F
    if PTX:
        return tl.inline_asm_elementwise(
            _PAIRS_PTX,
            "=r,=r,r,r,r", [words, codes, tl.full(words.shape, 0, tl.int32) + base2],
            dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        even = (words & 0x00FF00FF) * 0x101
        odd = ((words >> 8) & 0x00FF00FF) * 0x101
        exp_even = (codes & 0x0F0F) * 0x8080 + base2
        exp_odd = (codes & 0xF0F0) * 0x808 + base2
        return ((even & SIGN_MANTISSA) | (exp_even & ~SIGN_MANTISSA),
                (odd & SIGN_MANTISSA) | (exp_odd & ~SIGN_MANTISSA))


@triton.jit
def _halves(pairs):
    """[..., 2]: the low and high 16 bits of each 32-bit word."""
    return tl.join(pairs & 0xFFFF, (pairs >> 16) & 0xFFFF)


@triton.jit
def _weight_loads(word_ptr, code_ptr, row_words, o, rows, N, start, word, end, EVEN: tl.constexpr):
    """One MMA step's weight loads for _nibble_rows_dot, `o` words into each warp's columns: the
    sign+mantissa words and their codes."""
    if EVEN:
        packed = tl.load(word_ptr + row_words + o)
        packed_codes = tl.load(code_ptr + row_words + o).to(tl.int32)
    else:
        ok = (rows < N)[:, None] & (start[:, None] + o + word[None, :] < end)
        packed = tl.load(word_ptr + row_words + o, mask=ok, other=0)
        packed_codes = tl.load(code_ptr + row_words + o, mask=ok, other=0).to(tl.int32)
    return packed, packed_codes


@triton.jit
def _x_loads(x_ptr, x_words, o, end, x_start, x_word, batch_ok, EVEN: tl.constexpr):
    """One MMA step's x for _nibble_rows_dot, as two 16-byte pieces."""
    if EVEN:
        lo_ok = batch_ok
        hi_ok = batch_ok
    else:
        x_at = x_start[:, None] + o + x_word[None, :]
        lo_ok = batch_ok & (x_at < end)
        hi_ok = batch_ok & (x_at + 2 < end)
    x_lo = tl.load(x_ptr + x_words + o, mask=lo_ok, other=0)
    x_hi = tl.load(x_ptr + x_words + (o + 2), mask=hi_ok, other=0)
    return x_lo, x_hi


@triton.jit
def _step_loads(word_ptr, code_ptr, x_ptr, row_words, x_words, o, rows, N, start, word, end, x_start, x_word,
                batch_ok, EVEN: tl.constexpr):
    """One MMA step's loads: _weight_loads, then _x_loads."""
    packed, packed_codes = _weight_loads(word_ptr, code_ptr, row_words, o, rows, N, start, word, end, EVEN)
    x_lo, x_hi = _x_loads(x_ptr, x_words, o, end, x_start, x_word, batch_ok, EVEN)
    return packed, packed_codes, x_lo, x_hi


@triton.jit
def _step_mma(acc, packed, packed_codes, x_lo, x_hi, base2, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_FP32: tl.constexpr, WARPS: tl.constexpr, PTX: tl.constexpr):
    """acc plus one MMA step of _nibble_rows_dot: the loaded words decoded into the operand
    layout (see there), x permuted to the same K order."""
    NT: tl.constexpr = BLOCK_N // 8
    LANE_WORDS: tl.constexpr = 4
    KQ: tl.constexpr = 16 * LANE_WORDS
    even, odd = _bf16_pairs(packed, packed_codes, base2, PTX)
    # [v, word, 2, 2] -> (q, word j, lane t, pair, half, nt, g) -> (q, K, BLOCK_N)
    w = tl.reshape(tl.join(_halves(even), _halves(odd)).to(tl.int16), (NT, WARPS, 8, 4, LANE_WORDS, 2, 2))
    w = tl.reshape(tl.permute(w, (1, 4, 3, 6, 5, 0, 2)), (WARPS, KQ, BLOCK_N)).to(tl.bfloat16, bitcast=True)
    # x: [xv, 8, 2 (lo/hi load)] -> 4 bf16 each, in the weights' order (0, 2, 1, 3)
    xw = tl.join(x_lo, x_hi)
    xs = tl.join(tl.join(xw & 0xFFFF, (xw >> 32) & 0xFFFF), tl.join((xw >> 16) & 0xFFFF, (xw >> 48) & 0xFFFF))
    xs = tl.reshape(xs.to(tl.int16), (WARPS, 8, 4, 2, 2, 2, 2))  # q, b, t, word, lo/hi, pos
    xs = tl.reshape(tl.permute(xs, (0, 1, 4, 3, 2, 6, 5)), (WARPS, 8, KQ))
    # the MMA's 16 rows: the batch's 8, then zeros
    xs = tl.reshape(tl.permute(tl.join(xs, tl.zeros_like(xs)), (0, 3, 1, 2)), (WARPS, B_PAD, KQ))
    xs = xs.to(tl.bfloat16, bitcast=True)
    if DOT_FP32:
        return tl.dot(xs.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(xs, w, acc)


@triton.jit
def _dot_geometry(pid, words_per_row, stride_xw, warp_words, B: tl.constexpr, BLOCK_N: tl.constexpr,
                  WARPS: tl.constexpr):
    """Where _nibble_rows_dot's program reads: its tile's rows, each lane's words of them, and x."""
    NT: tl.constexpr = BLOCK_N // 8  # groups of 8 rows (the MMA's N)
    LANE_WORDS: tl.constexpr = 4
    ROW_WORDS: tl.constexpr = 4 * LANE_WORDS  # words of a row a warp reads per MMA step (64 columns)
    # warp_words = span / 4 / WARPS, an argument: Triton then knows its divisibility (16-byte loads)
    split = tl.program_id(1)
    first = split * WARPS * warp_words
    end = tl.minimum(first + WARPS * warp_words, words_per_row)
    # tile rows v = (group nt, warp q, row g of 8): 8 lanes down, warps, then registers
    v = tl.arange(0, NT * WARPS * 8)
    rows = pid * BLOCK_N + 8 * (v // (8 * WARPS)) + v % 8
    start = first + ((v // 8) % WARPS) * warp_words
    word = tl.max_contiguous(tl.arange(0, ROW_WORDS), LANE_WORDS)
    row_words = rows.to(tl.int64)[:, None] * words_per_row + start[:, None] + word[None, :]
    # x: rows (warp q, batch row b of 8), 2 x 8 64-bit words (4 bf16 each: the inputs of one weight
    # word); lane t reads words 4t, 4t + 1 and then 4t + 2, 4t + 3 (16 bytes each)
    xv = tl.arange(0, WARPS * 8)
    batch_ok = (xv % 8 < B)[:, None]
    x_start = first + (xv // 8) * warp_words
    x_word = tl.max_contiguous(4 * (tl.arange(0, 8) // 2) + tl.arange(0, 8) % 2, 2)
    x_words = (xv % 8 * stride_xw + x_start)[:, None] + x_word[None, :]
    return rows, start, word, row_words, end, batch_ok, x_start, x_word, x_words


@triton.jit
def _first_turn(word_ptr, code_ptr, x_ptr, row_words, x_words, rows, N, start, word, end, x_start, x_word, batch_ok,
                EVEN: tl.constexpr, PDL: tl.constexpr, WAIT: tl.constexpr, LATE: tl.constexpr):
    """The loads of _dot_turns' first turn (two MMA steps). WAIT: the weights, which no kernel
    writes, are issued before the wait for the kernel before (PDL), so they arrive while it ends;
    x after it."""
    ROW_WORDS: tl.constexpr = 16
    a0, a1 = _weight_loads(word_ptr, code_ptr, row_words, 0, rows, N, start, word, end, EVEN)
    b0, b1 = _weight_loads(word_ptr, code_ptr, row_words, ROW_WORDS, rows, N, start, word, end, EVEN)
    if WAIT:
        _wait_for_x(PDL, LATE)
    a2, a3 = _x_loads(x_ptr, x_words, 0, end, x_start, x_word, batch_ok, EVEN)
    b2, b3 = _x_loads(x_ptr, x_words, ROW_WORDS, end, x_start, x_word, batch_ok, EVEN)
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _dot_turns(acc, a0, a1, a2, a3, b0, b1, b2, b3, word_ptr, code_ptr, x_ptr, row_words, x_words, rows, N, start,
               word, end, x_start, x_word, batch_ok, warp_words, base2, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               EVEN: tl.constexpr, DOT_FP32: tl.constexpr, WARPS: tl.constexpr, PTX: tl.constexpr):
    """_nibble_rows_dot's loop, two MMA steps a turn, given its first turn's loads (a, b). Loads
    run one loop turn ahead: the next turn's words are in flight while this turn's are decoded
    (without it warps mostly wait on memory: ncu's long-scoreboard stalls)."""
    ROW_WORDS: tl.constexpr = 16
    for w0 in range(0, warp_words, 2 * ROW_WORDS):
        # the last turn loads itself again (cached, unused) instead of masking every turn
        ahead = tl.minimum(w0 + 2 * ROW_WORDS, warp_words - 2 * ROW_WORDS)
        c0, c1, c2, c3 = _step_loads(word_ptr, code_ptr, x_ptr, row_words, x_words, ahead, rows, N, start, word,
                                     end, x_start, x_word, batch_ok, EVEN)
        d0, d1, d2, d3 = _step_loads(word_ptr, code_ptr, x_ptr, row_words, x_words, ahead + ROW_WORDS, rows, N,
                                     start, word, end, x_start, x_word, batch_ok, EVEN)
        acc = _step_mma(acc, a0, a1, a2, a3, base2, B_PAD, BLOCK_N, DOT_FP32, WARPS, PTX)
        acc = _step_mma(acc, b0, b1, b2, b3, base2, B_PAD, BLOCK_N, DOT_FP32, WARPS, PTX)
        a0, a1, a2, a3 = c0, c1, c2, c3
        b0, b1, b2, b3 = d0, d1, d2, d3
    return acc


@triton.jit
def _dot_escapes(acc, x, tile_escapes, extra, first_extra, last_extra, span, stride_xb, B: tl.constexpr,
                 B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, DOT_FP32: tl.constexpr):
    """The warps' sums (WARPS, B_PAD, BLOCK_N) of _nibble_rows_dot added, and the tile's escapes
    in this split's columns corrected (_escape_dot)."""
    lo = tl.program_id(1) * span
    acc = _escape_dot(tl.sum(acc, axis=0), x, tile_escapes, lo, lo + span, stride_xb, B, B_PAD, BLOCK_N, DOT_FP32)
    for e0 in range(first_extra, last_extra, SLOTS):  # rare: more escapes than slots
        acc = _escape_dot(acc, x, _extra_escapes(extra, e0, last_extra, SLOTS), lo, lo + span, stride_xb, B, B_PAD,
                          BLOCK_N, DOT_FP32)
    return acc


@triton.jit
def _nibble_rows_dot(
    x, sign_mantissa, codes, escapes, slots, pid,
    N, words_per_row, base, stride_xw, stride_xb, span, warp_words,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
    DOT_FP32: tl.constexpr, WARPS: tl.constexpr, SLOTS: tl.constexpr, PTX: tl.constexpr,
    PDL: tl.constexpr, WAIT: tl.constexpr, LATE: tl.constexpr,
):
    """_nibble_rows for batches of 2-8 on tensor cores (mma.sync through tl.dot), over columns
    [span * s, span * (s + 1)) for split s (axis 1 of the grid), which the WARPS warps cut in
    WARPS equal parts: warp q sums its part of every row of the tile, a batched tl.dot with one
    batch per warp, and the parts are added once at the end. Returns fp32 (B_PAD = 16, BLOCK_N).

    Decoded weights go straight from registers into the MMA, with no trip through shared memory:
    a dot product takes its terms in any order, so the K order is chosen to suit the hardware.
    Triton's MMA operand layout gives each lane 4 consecutive K positions per 16 (kWidth 4): lanes
    t = 0..3 of a group of 4 take 4 words each, laid out as 16 contiguous words of the row (one
    16-byte load), and word j of lane t holds K positions 4t + 16j + (0, 2, 1, 3) for its weights
    (0, 1, 2, 3), the order _bf16_pairs packs them in. x is read in the same order. The tiles are
    2-D (rows, words) with contiguity hints, so Triton's coalescing gives every Triton version the
    same load layout: the register layout of the operand, up to a reordering of registers (checked
    on the SASS: no shared memory, no barrier in the loop). BK (a multiple of 64) is the columns a
    warp takes per loop step.

    Escapes: the loop takes each at its code-15 value; the tile's escape table (EscapeTable) is
    read before the loop, so its latency hides behind it, and applied after it as two more MMAs
    (_escape_dot). BLOCK_N is ESCAPE_TILE: a program is one tile of the table.

    WAIT (two MMA steps a turn): the program waits for the kernel before (PDL) here, after it has
    issued its first turn's weight loads (weights are written by no kernel), so they arrive while
    that kernel ends; x is loaded after the wait. On an H100 at batch 8 this took tinyllama's q/k/v
    launch from 6.0 to 5.6 us and o from 4.9 to 4.7."""
    ROW_WORDS: tl.constexpr = 16
    STEPS: tl.constexpr = BK // (4 * ROW_WORDS)
    rows, start, word, row_words, end, batch_ok, x_start, x_word, x_words = _dot_geometry(
        pid, words_per_row, stride_xw, warp_words, B, BLOCK_N, WARPS)
    word_ptr = sign_mantissa.to(tl.pointer_type(tl.int32))
    code_ptr = codes.to(tl.pointer_type(tl.uint16))
    x_ptr = x.to(tl.pointer_type(tl.uint64))
    base2 = _base2(base)
    # The tile's escapes: issued before the loop, used after it (read after it, ~10 per tile of
    # 16 x 4096 one by one, they were a chain of dependent loads as long as the loop). Triton loads
    # them in two layouts; LLVM moves the one-hot matrices' copy past the loop (it has no stores),
    # which costs nothing: the x gather after the loop takes the other copy (Triton 3.6 SASS).
    tile_escapes, extra, first_extra, last_extra = _tile_escapes(escapes, slots, pid, N, SLOTS)
    acc = tl.zeros((WARPS, B_PAD, BLOCK_N), dtype=tl.float32)
    if STEPS == 2:
        a0, a1, a2, a3, b0, b1, b2, b3 = _first_turn(word_ptr, code_ptr, x_ptr, row_words, x_words, rows, N, start,
                                                     word, end, x_start, x_word, batch_ok, EVEN, PDL, WAIT, LATE)
        acc = _dot_turns(acc, a0, a1, a2, a3, b0, b1, b2, b3, word_ptr, code_ptr, x_ptr, row_words, x_words, rows, N,
                         start, word, end, x_start, x_word, batch_ok, warp_words, base2, B_PAD, BLOCK_N, EVEN,
                         DOT_FP32, WARPS, PTX)
    else:
        if WAIT:
            _wait_for_x(PDL, LATE)
        for w0 in range(0, warp_words, ROW_WORDS * STEPS):
            for step in tl.static_range(STEPS):
                a0, a1, a2, a3 = _step_loads(word_ptr, code_ptr, x_ptr, row_words, x_words, w0 + step * ROW_WORDS,
                                             rows, N, start, word, end, x_start, x_word, batch_ok, EVEN)
                acc = _step_mma(acc, a0, a1, a2, a3, base2, B_PAD, BLOCK_N, DOT_FP32, WARPS, PTX)
    return _dot_escapes(acc, x, tile_escapes, extra, first_extra, last_extra, span, stride_xb, B, B_PAD, BLOCK_N,
                        SLOTS, DOT_FP32)


@triton.jit
def _nibble_gated_dot(
    x, sm0, codes0, et0, es0, base0, sm1, codes1, et1, es1, base1, pid,
    N, words_per_row, stride_xw, stride_xb, span, warp_words,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr,
    DOT_FP32: tl.constexpr, WARPS: tl.constexpr, SLOTS: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr,
):
    """_nibble_rows_dot (two MMA steps a turn, waiting for x after its first weight loads) of the
    same rows of gate and up, one after the other, with up's first turn of loads in flight while
    gate's escapes are corrected (up would otherwise start with a wait on memory); the two share
    their geometry (one shape). 128 registers a thread (_config's cap) keep 4 programs an SM."""
    ROW_WORDS: tl.constexpr = 16
    rows, start, word, row_words, end, batch_ok, x_start, x_word, x_words = _dot_geometry(
        pid, words_per_row, stride_xw, warp_words, B, BLOCK_N, WARPS)
    gate_words = sm0.to(tl.pointer_type(tl.int32))
    gate_codes = codes0.to(tl.pointer_type(tl.uint16))
    up_words = sm1.to(tl.pointer_type(tl.int32))
    up_codes = codes1.to(tl.pointer_type(tl.uint16))
    x_ptr = x.to(tl.pointer_type(tl.uint64))
    gate_escapes, gate_extra, gate_first, gate_last = _tile_escapes(et0, es0, pid, N, SLOTS)
    up_escapes, up_extra, up_first, up_last = _tile_escapes(et1, es1, pid, N, SLOTS)
    a0, a1, a2, a3, b0, b1, b2, b3 = _first_turn(gate_words, gate_codes, x_ptr, row_words, x_words, rows, N, start,
                                                 word, end, x_start, x_word, batch_ok, EVEN, PDL, True, True)
    gate = _dot_turns(tl.zeros((WARPS, B_PAD, BLOCK_N), dtype=tl.float32), a0, a1, a2, a3, b0, b1, b2, b3,
                      gate_words, gate_codes, x_ptr, row_words, x_words, rows, N, start, word, end, x_start, x_word,
                      batch_ok, warp_words, _base2(base0), B_PAD, BLOCK_N, EVEN, DOT_FP32, WARPS, PTX)
    a0, a1, a2, a3 = _step_loads(up_words, up_codes, x_ptr, row_words, x_words, 0, rows, N, start, word, end,
                                 x_start, x_word, batch_ok, EVEN)
    b0, b1, b2, b3 = _step_loads(up_words, up_codes, x_ptr, row_words, x_words, ROW_WORDS, rows, N, start, word, end,
                                 x_start, x_word, batch_ok, EVEN)
    gate = _dot_escapes(gate, x, gate_escapes, gate_extra, gate_first, gate_last, span, stride_xb, B, B_PAD, BLOCK_N,
                        SLOTS, DOT_FP32)
    up = _dot_turns(tl.zeros((WARPS, B_PAD, BLOCK_N), dtype=tl.float32), a0, a1, a2, a3, b0, b1, b2, b3,
                    up_words, up_codes, x_ptr, row_words, x_words, rows, N, start, word, end, x_start, x_word,
                    batch_ok, warp_words, _base2(base1), B_PAD, BLOCK_N, EVEN, DOT_FP32, WARPS, PTX)
    up = _dot_escapes(up, x, up_escapes, up_extra, up_first, up_last, span, stride_xb, B, B_PAD, BLOCK_N,
                      SLOTS, DOT_FP32)
    return gate, up


@triton.jit
def _tma_step(acc, words, codes, xs, base2, DOT_FP32: tl.constexpr, WARPS: tl.constexpr, PTX: tl.constexpr):
    """_step_mma on one MMA step of a TMA turn (_nibble_rows_tma): words and codes (2, WARPS, 8,
    16), x (WARPS, 8, 4, 2, 2 halves) put into the register kernel's shapes."""
    x_lo, x_hi = tl.split(xs)
    return _step_mma(acc, tl.reshape(words, (2 * WARPS * 8, 16)), tl.reshape(codes, (2 * WARPS * 8, 16)),
                     tl.reshape(x_lo, (WARPS * 8, 8)), tl.reshape(x_hi, (WARPS * 8, 8)), base2, 16, 16, DOT_FP32,
                     WARPS, PTX)


@triton.jit
def _nibble_rows_tma(x, x_tiles, word_tiles, code_tiles, escapes, slots, base, N, pid, warp_words, stride_xb,
                     B: tl.constexpr, WARPS: tl.constexpr, SLOTS: tl.constexpr, PTX: tl.constexpr,
                     DOT_FP32: tl.constexpr, STAGES: tl.constexpr):
    """_nibble_rows_dot's sums (same warps, K order, MMA steps and escapes: the same bits) with
    each turn's tiles brought into shared memory by TMA, STAGES turns ahead (Triton's pipeliner),
    instead of register loads one turn ahead. The descriptors view the words, codes and x as
    (rows, 1, WARPS, warp_words): a turn is 16 rows x 32 words of each warp's part of K, and x's
    8 rows (those past B read as zeros, as do rows past N)."""
    BLOCK_N: tl.constexpr = 16  # ESCAPE_TILE
    tile_escapes, extra, first_extra, last_extra = _tile_escapes(escapes, slots, pid, N, SLOTS)
    base2 = _base2(base)
    acc = tl.zeros((WARPS, 16, BLOCK_N), dtype=tl.float32)
    for turn in tl.range(0, warp_words, 32, num_stages=STAGES):
        words = tl.reshape(word_tiles.load([pid * BLOCK_N, 0, 0, turn]), (2, 8, WARPS, 2, 16))
        codes = tl.reshape(code_tiles.load([pid * BLOCK_N, 0, 0, turn]), (2, 8, WARPS, 2, 16)).to(tl.int32)
        xs = tl.reshape(x_tiles.load([0, 0, 0, turn]), (8, WARPS, 2, 4, 2, 2))
        # rows (group nt, row g), words (warp q, step s, word): step s's (nt, q, g) x 16 words
        words0, words1 = tl.split(tl.permute(words, (0, 2, 1, 4, 3)))
        codes0, codes1 = tl.split(tl.permute(codes, (0, 2, 1, 4, 3)))
        # x (row b, warp q, step s, lane t, half, pair): step s's (q, b, t, pair, half)
        x0, x1 = tl.split(tl.permute(xs, (1, 0, 3, 5, 4, 2)))
        acc = _tma_step(acc, words0, codes0, x0, base2, DOT_FP32, WARPS, PTX)
        acc = _tma_step(acc, words1, codes1, x1, base2, DOT_FP32, WARPS, PTX)
    return _dot_escapes(acc, x, tile_escapes, extra, first_extra, last_extra, 4 * WARPS * warp_words, stride_xb, B,
                        16, BLOCK_N, SLOTS, DOT_FP32)


@triton.jit
def _escape_dot(acc, x, packed, lo, hi, stride_xb, B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_FP32: tl.constexpr):
    """acc (B_PAD, BLOCK_N) with the escapes `packed` (EscapeTable entries, 0 for none) of
    columns [lo, hi) corrected: x times each's loop value taken out, then x times its true value
    added, as two MMAs of x's escaped columns (B_PAD, SLOTS) with a matrix (SLOTS, BLOCK_N) that
    holds each escape's value in its row's column and zeros elsewhere. Exact products, as in the
    loop's MMAs; out first, then in (see _escape_sums). BLOCK_N = ESCAPE_TILE."""
    col, row, values = _entry_fields(packed)
    take = (values != 0) & (col >= lo) & (col < hi)
    batch = tl.arange(0, B_PAD)
    xs = tl.load(x + batch[:, None] * stride_xb + col[None, :], mask=(batch < B)[:, None] & take[None, :], other=0)
    hit = (row[:, None] == tl.arange(0, BLOCK_N)[None, :]) & take[:, None]
    taken_out = tl.where(hit, (values & 0xFFFF)[:, None], 0).to(tl.int16).to(tl.bfloat16, bitcast=True)
    put_in = tl.where(hit, ((values >> 16) & 0xFFFF)[:, None], 0).to(tl.int16).to(tl.bfloat16, bitcast=True)
    if DOT_FP32:
        acc = tl.dot(xs.to(tl.float32), taken_out.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(xs.to(tl.float32), put_in.to(tl.float32), acc, input_precision="ieee")
    acc = tl.dot(xs, taken_out, acc)
    return tl.dot(xs, put_in, acc)


@triton.jit
def _store_result(where, acc, up, ok, GATED: tl.constexpr):
    """acc in the output's dtype, or when GATED silu(acc) * up, each first rounded to bf16 as the
    two separate GEMVs' outputs would be."""
    if GATED:
        store_bf16(where, silu_times(bf16_round(acc), bf16_round(up)), ok)
    else:
        tl.store(where, acc.to(where.dtype.element_ty), mask=ok)


@triton.jit
def _emit(out, partials, counters, acc, up, pid, N, stride_ob, stride_pb, B: tl.constexpr, B_PAD: tl.constexpr,
          BLOCK_N: tl.constexpr, GATED: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
          LATE: tl.constexpr):
    """Store (B_PAD, BLOCK_N) results at rows pid * BLOCK_N... (_store_result). With SPLIT > 1
    this program's fp32 sums go to its split's slice of `partials` (up beside acc, N columns on),
    and the last of the SPLIT programs of these rows to get there adds the slices up in split
    order (the same result on every run, unlike atomic adds) and stores the result: no second
    launch. `counters` (one int32 per program of axis 0, zero between launches) counts arrivals."""
    if LATE:  # PDL: a launch that lets the next kernel launch only here (see _nibble_kernel)
        launch_next(PDL)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    batch = tl.arange(0, B_PAD)
    ok = (batch < B)[:, None] & (rows < N)[None, :]
    if SPLIT > 1:
        where = partials + (tl.program_id(1) * B + batch[:, None]) * stride_pb + rows[None, :]
        tl.store(where, acc, mask=ok)
        if GATED:
            tl.store(where + N, up, mask=ok)
        if last_to_arrive(counters, tl.program_id(0), SPLIT):
            acc = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
            up = tl.zeros((B_PAD, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT):  # from L2 (.cg): other SMs wrote them
                at = partials + (s * B + batch[:, None]) * stride_pb + rows[None, :]
                acc += tl.load(at, mask=ok, other=0, cache_modifier=".cg")
                if GATED:
                    up += tl.load(at + N, mask=ok, other=0, cache_modifier=".cg")
            _store_result(out + batch[:, None] * stride_ob + rows[None, :], acc, up, ok, GATED)
            tl.atomic_xchg(counters + tl.program_id(0), 0)  # zero again for the next launch
    else:
        _store_result(out + batch[:, None] * stride_ob + rows[None, :], acc, up, ok, GATED)


@triton.jit
def _nibble_block(
    x, sign_mantissa, codes, escapes, slots, pid,
    N, words_per_row, base, stride_xw, stride_xb, span, warp_words,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, WARPS: tl.constexpr, SLOTS: tl.constexpr, PTX: tl.constexpr,
    PDL: tl.constexpr, EARLY: tl.constexpr, LATE: tl.constexpr,
):
    """One program's rows of one matrix (`escapes`, `slots`: its EscapeTable). EARLY: it waits
    for its inputs itself (PDL), after its first weight loads."""
    if USE_DOT:
        acc = _nibble_rows_dot(x, sign_mantissa, codes, escapes, slots, pid, N, words_per_row, base, stride_xw,
                               stride_xb, span, warp_words, B, B_PAD, BLOCK_N, BK, EVEN, DOT_FP32, WARPS, SLOTS, PTX,
                               PDL, EARLY, LATE)
    else:
        acc, _ = _nibble_rows(x, sign_mantissa, codes, escapes, slots, sign_mantissa, codes, escapes, slots, base,
                              pid, N, words_per_row, base, stride_xw, stride_xb, B, B_PAD, BLOCK_N, BK, EVEN, SLOTS,
                              PTX, PDL, EARLY, LATE, False)
    return acc


@triton.jit
def _nibble_segment(
    x, out, partials, counters, after0, after1, sign_mantissa, codes, escapes, slots, base, N, pid, words_per_row,
    stride_xw, stride_xb, stride_ob, stride_pb, span, warp_words,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, WARPS: tl.constexpr, SLOTS: tl.constexpr, PTX: tl.constexpr,
    SPLIT: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, LATE: tl.constexpr,
):
    """One matrix's rows of a _nibble_kernel launch (pid counted from its segment's first
    program), stored in its columns of the output: after those of the segments before it
    (`after0` + `after1` columns, added to the pointers one at a time after the loop, as the
    inlined branches did: the same SASS as they had)."""
    acc = _nibble_block(x, sign_mantissa, codes, escapes, slots, pid, N, words_per_row, base, stride_xw, stride_xb,
                        span, warp_words, B, B_PAD, BLOCK_N, BK, EVEN, USE_DOT, DOT_FP32, WARPS, SLOTS, PTX, PDL,
                        EARLY, LATE)
    _emit(out + after0 + after1, partials + after0 + after1, counters, acc, acc, pid, N, stride_ob, stride_pb, B, B_PAD,
          BLOCK_N, False, SPLIT, PDL, LATE)


@triton.jit(do_not_specialize=["base0", "base1", "base2"])
def _nibble_kernel(
    x, out, partials, counters,
    sm0, codes0, et0, es0, base0, n0,
    sm1, codes1, et1, es1, base1, n1,
    sm2, codes2, et2, es2, base2, n2,
    p1, p2, span, warp_words, words_per_row, stride_xw, stride_xb, stride_ob, stride_pb,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, SEGMENTS: tl.constexpr, GATED: tl.constexpr,
    SPLIT: tl.constexpr, WARPS: tl.constexpr, SLOTS: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr,
    PTX: tl.constexpr, EARLY: tl.constexpr, PAIR: tl.constexpr,
):
    # Up to three matrices of the same input width in one launch (q/k/v): programs [0, p1) take
    # matrix 0, [p1, p2) matrix 1, the rest matrix 2, each writing its own columns of `out`.
    # GATED: programs take the same rows of matrices 0 and 1 (gate, up) and store silu(g) * u.
    # Each branch inlines the row loop with its own pointers, so every load keeps the alignment
    # Triton knows for its arguments. Per matrix: sign+mantissa, codes, escape table and its
    # slots, window base, rows.
    # PDL (pdl.py): the programs wait for the kernel that wrote x, then let the next kernel launch,
    # a small one (RoPE, RMSNorm) whose programs then wait on the GPU for this one to end. Not so
    # where LATE: those launches let the next kernel launch after their loops (_emit). The gated
    # launch is followed by the down projection, another GEMV, whose programs, placed while
    # gate/up runs, would go to the SMs that gate/up leaves free first, unevenly (nibble down at
    # batch 1: 10.3 -> 14.1 us, session 17). Since then nibble's down got faster, and on tinyllama
    # (gate/up of 23 M weights, down 2048 programs) letting it in early pays at batch 1: profiled
    # per kernel in the step (session 23, two runs), gate/up 13.2 -> 15.0 us but down 8.8 -> 6.3,
    # the step -1.3% / -1.4%. On the 8B (117 M) both got slower (gate/up 59.3 -> 62.0, down 32.0 ->
    # 35.0, step +3.7%): so only below EARLY_GATED_WEIGHTS. Nibble launches on tensor cores of
    # LATE_TRIGGER_WEIGHTS or more (the 8B's, not tinyllama's) ran faster late too: 8B at batch 8,
    # 1.071x -> 1.103x of bf16, timed in turn. At batch 1 (CUDA cores, thousands of programs) the
    # 8B ran slower so (1.256x -> 1.206x), and tinyllama's launches at batch 8 gained nothing
    # (1.016x -> 1.006x).
    # EARLY: the programs load their first turn of weights before they wait.
    pid = tl.program_id(0)
    if GATED:
        if EARLY and USE_DOT:
            gate, up = _nibble_gated_dot(x, sm0, codes0, et0, es0, base0, sm1, codes1, et1, es1, base1, pid, n0,
                                         words_per_row, stride_xw, stride_xb, span, warp_words, B, B_PAD, BLOCK_N,
                                         EVEN, DOT_FP32, WARPS, SLOTS, PTX, PDL)
        elif PAIR and not USE_DOT:
            gate, up = _nibble_rows(x, sm0, codes0, et0, es0, sm1, codes1, et1, es1, base1, pid, n0, words_per_row,
                                    base0, stride_xw, stride_xb, B, B_PAD, BLOCK_N, BK, EVEN, SLOTS, PTX, PDL, EARLY,
                                    LATE, True)
        else:
            if not EARLY:
                wait_for_inputs(PDL)
            gate = _nibble_block(x, sm0, codes0, et0, es0, pid, n0, words_per_row, base0, stride_xw,
                                 stride_xb, span, warp_words, B, B_PAD, BLOCK_N, BK, EVEN, USE_DOT, DOT_FP32, WARPS,
                                 SLOTS, PTX, PDL, EARLY, True)
            up = _nibble_block(x, sm1, codes1, et1, es1, pid, n0, words_per_row, base1, stride_xw,
                               stride_xb, span, warp_words, B, B_PAD, BLOCK_N, BK, EVEN, USE_DOT, DOT_FP32, WARPS,
                               SLOTS, PTX, PDL, False, True)
        _emit(out, partials, counters, gate, up, pid, n0, stride_ob, stride_pb, B, B_PAD, BLOCK_N, True, SPLIT, PDL,
              LATE)
    else:
        # The segment of this program; the branches below are pruned to SEGMENTS at compile time
        # (p1, p2 = the grid size where a segment is absent).
        seg = (pid >= p1).to(tl.int32) + (pid >= p2).to(tl.int32)
        if not EARLY:
            _wait_for_x(PDL, LATE)
        if seg == 0:
            _nibble_segment(x, out, partials, counters, 0, 0, sm0, codes0, et0, es0, base0, n0, pid, words_per_row,
                            stride_xw, stride_xb, stride_ob, stride_pb, span, warp_words, B, B_PAD, BLOCK_N, BK, EVEN,
                            USE_DOT, DOT_FP32, WARPS, SLOTS, PTX, SPLIT, PDL, EARLY, LATE)
        if SEGMENTS >= 2:
            if seg == 1:
                _nibble_segment(x, out, partials, counters, n0, 0, sm1, codes1, et1, es1, base1, n1, pid - p1,
                                words_per_row, stride_xw, stride_xb, stride_ob, stride_pb, span, warp_words, B, B_PAD,
                                BLOCK_N, BK, EVEN, USE_DOT, DOT_FP32, WARPS, SLOTS, PTX, SPLIT, PDL, EARLY, LATE)
        if SEGMENTS == 3:
            if seg == 2:
                _nibble_segment(x, out, partials, counters, n0, n1, sm2, codes2, et2, es2, base2, n2,
                                pid - p2, words_per_row, stride_xw, stride_xb, stride_ob, stride_pb, span, warp_words,
                                B, B_PAD, BLOCK_N, BK, EVEN, USE_DOT, DOT_FP32, WARPS, SLOTS, PTX, SPLIT, PDL, EARLY,
                                LATE)


@triton.jit
def _tma_segment(x, x_tiles, out, after0, after1, word_tiles, code_tiles, escapes, slots, base, N, pid, warp_words,
                 stride_xb, stride_ob, B: tl.constexpr, WARPS: tl.constexpr, SLOTS: tl.constexpr, PTX: tl.constexpr,
                 DOT_FP32: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr):
    """_nibble_segment for _nibble_tma_kernel: one matrix's rows pid * 16... (pid counted from its
    segment's first program), stored after the `after0` + `after1` columns of the segments before."""
    acc = _nibble_rows_tma(x, x_tiles, word_tiles, code_tiles, escapes, slots, base, N, pid, warp_words, stride_xb,
                           B, WARPS, SLOTS, PTX, DOT_FP32, STAGES)
    where = out + after0 + after1
    _emit(where, where, where, acc, acc, pid, N, stride_ob, 0, B, 16, 16, False, 1, PDL, LATE)


@triton.jit(do_not_specialize=["base0", "base1", "base2"])
def _nibble_tma_kernel(
    x, x_tiles, out,
    wt0, ct0, et0, es0, base0, n0,
    wt1, ct1, et1, es1, base1, n1,
    wt2, ct2, et2, es2, base2, n2,
    p1, p2, warp_words, stride_xb, stride_ob,
    B: tl.constexpr, WARPS: tl.constexpr, SLOTS: tl.constexpr, PTX: tl.constexpr, DOT_FP32: tl.constexpr,
    STAGES: tl.constexpr, SEGMENTS: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr,
):
    """_nibble_kernel on tensor cores for launches that _tma_warps picks, its tiles read by TMA
    (_nibble_rows_tma; wt*, ct*: each matrix's word and code descriptors). It waits for x first:
    Triton's pipeliner issues the first turns' loads, x's among them, where the loop starts."""
    pid = tl.program_id(0)
    wait_for_inputs(PDL)
    if not LATE:
        launch_next(PDL)
    if GATED:
        gate = _nibble_rows_tma(x, x_tiles, wt0, ct0, et0, es0, base0, n0, pid, warp_words, stride_xb, B, WARPS,
                                SLOTS, PTX, DOT_FP32, STAGES)
        up = _nibble_rows_tma(x, x_tiles, wt1, ct1, et1, es1, base1, n0, pid, warp_words, stride_xb, B, WARPS,
                              SLOTS, PTX, DOT_FP32, STAGES)
        _emit(out, out, out, gate, up, pid, n0, stride_ob, 0, B, 16, 16, True, 1, PDL, LATE)
    else:
        seg = (pid >= p1).to(tl.int32) + (pid >= p2).to(tl.int32)
        if seg == 0:
            _tma_segment(x, x_tiles, out, 0, 0, wt0, ct0, et0, es0, base0, n0, pid, warp_words, stride_xb, stride_ob,
                         B, WARPS, SLOTS, PTX, DOT_FP32, STAGES, PDL, LATE)
        if SEGMENTS >= 2:
            if seg == 1:
                _tma_segment(x, x_tiles, out, n0, 0, wt1, ct1, et1, es1, base1, n1, pid - p1, warp_words, stride_xb,
                             stride_ob, B, WARPS, SLOTS, PTX, DOT_FP32, STAGES, PDL, LATE)
        if SEGMENTS == 3:
            if seg == 2:
                _tma_segment(x, x_tiles, out, n0, n1, wt2, ct2, et2, es2, base2, n2, pid - p2, warp_words,
                             stride_xb, stride_ob, B, WARPS, SLOTS, PTX, DOT_FP32, STAGES, PDL, LATE)


@triton.jit
def _plain_rows(
    x, weight, pid, N, K, stride_xb, span,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """fp32 (B_PAD, BLOCK_N): rows pid * BLOCK_N... of a plain matrix times x (columns [span * s,
    span * (s + 1)) for split s, axis 1 of the grid)."""
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    batch = tl.arange(0, B_PAD)
    batch_ok = batch < B
    row_start = weight + rows.to(tl.int64)[:, None] * K
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, B_PAD), dtype=tl.float32)
    elif B_PAD == 1:  # apart from the batch loop below: as that loop with B_PAD = 1 batch 1 compiles
        # to 528 instructions and 48 registers instead of 424 and 40 (Triton 3.6)
        acc2 = tl.zeros((BLOCK_N, BK), dtype=tl.float32)
    else:  # a few rows on CUDA cores: each weight loaded once, used in B_PAD FMAs
        acc3 = tl.zeros((B_PAD, BLOCK_N, BK), dtype=tl.float32)
    split = tl.program_id(1)
    for k0 in range(split * span, tl.minimum(split * span + span, K), BK):
        cols = k0 + tl.arange(0, BK)
        w = tl.load(row_start + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0)
        if USE_DOT:
            xt = tl.load(x + batch[None, :] * stride_xb + cols[:, None],
                         mask=(cols < K)[:, None] & batch_ok[None, :], other=0)
            if DOT_FP32:
                w, xt = w.to(tl.float32), xt.to(tl.float32)
            acc += tl.dot(w.to(xt.dtype), xt, input_precision="ieee")
        elif B_PAD == 1:
            xv = tl.load(x + cols, mask=cols < K, other=0).to(tl.float32)
            acc2 += w.to(tl.float32) * xv[None, :]
        else:
            xv = tl.load(x + batch[:, None] * stride_xb + cols[None, :], mask=batch_ok[:, None] & (cols < K)[None, :],
                         other=0).to(tl.float32)
            acc3 += w.to(tl.float32)[None, :, :] * xv[:, None, :]
    if USE_DOT:
        acc = tl.trans(acc)
    elif B_PAD == 1:
        acc = tl.trans(tl.sum(acc2, axis=1)[:, None])
    else:
        acc = tl.sum(acc3, axis=2)
    return acc


@triton.jit
def _plain_segment(x, out, partials, counters, after0, after1, weight, N, pid, K, stride_xb, stride_ob, stride_pb, span,
                   B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr,
                   USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
                   LATE: tl.constexpr):
    """_nibble_segment for _plain_kernel."""
    acc = _plain_rows(x, weight, pid, N, K, stride_xb, span, B, B_PAD, BLOCK_N, BK, USE_DOT, DOT_FP32)
    _emit(out + after0 + after1, partials + after0 + after1, counters, acc, acc, pid, N, stride_ob, stride_pb, B, B_PAD,
          BLOCK_N, False, SPLIT, PDL, LATE)


@triton.jit
def _plain_kernel(
    x, out, partials, counters, w0, n0, w1, n1, w2, n2, p1, p2, span, K, stride_xb, stride_ob, stride_pb,
    B: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, SEGMENTS: tl.constexpr, GATED: tl.constexpr,
    SPLIT: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr,
):
    # Segments, GATED, PDL and LATE as in _nibble_kernel.
    pid = tl.program_id(0)
    if GATED:
        wait_for_inputs(PDL)
        gate = _plain_rows(x, w0, pid, n0, K, stride_xb, span, B, B_PAD, BLOCK_N, BK, USE_DOT, DOT_FP32)
        up = _plain_rows(x, w1, pid, n0, K, stride_xb, span, B, B_PAD, BLOCK_N, BK, USE_DOT, DOT_FP32)
        _emit(out, partials, counters, gate, up, pid, n0, stride_ob, stride_pb, B, B_PAD, BLOCK_N, True, SPLIT, PDL,
              LATE)
    else:
        seg = (pid >= p1).to(tl.int32) + (pid >= p2).to(tl.int32)
        _wait_for_x(PDL, LATE)
        if seg == 0:
            _plain_segment(x, out, partials, counters, 0, 0, w0, n0, pid, K, stride_xb, stride_ob, stride_pb, span, B,
                           B_PAD, BLOCK_N, BK, USE_DOT, DOT_FP32, SPLIT, PDL, LATE)
        if SEGMENTS >= 2:
            if seg == 1:
                _plain_segment(x, out, partials, counters, n0, 0, w1, n1, pid - p1, K, stride_xb, stride_ob,
                               stride_pb, span, B, B_PAD, BLOCK_N, BK, USE_DOT, DOT_FP32, SPLIT, PDL, LATE)
        if SEGMENTS == 3:
            if seg == 2:
                _plain_segment(x, out, partials, counters, n0, n1, w2, n2, pid - p2, K, stride_xb,
                               stride_ob, stride_pb, span, B, B_PAD, BLOCK_N, BK, USE_DOT, DOT_FP32, SPLIT, PDL, LATE)


def _config(n: int, k: int, batch: int, nibble: bool, gated: bool = False) -> tuple:
    """(BLOCK_N, BK, num_warps, splits of K, tensor cores[, pipeline stages]) for a launch over n
    rows in all (gate and up both counted when gated), from sweeps on an H100 (benchmarks/gemv.py
    `--sweep`, `--sweep-batch`; scratch/sweep4.py on branch wip/nibble-mma-registers)."""
    # a small matrix (<= 4 M weights, 8 MB of bf16) is latency-bound: at batches 2-4 a few rows a
    # program on CUDA cores, each weight read once for the batch, beat tensor-core tiles
    small = n * k <= 1 << 22
    mid = n * k <= 12 << 20  # tinyllama's matrices and launches but gate/up
    if nibble:
        if batch == 1:
            # one row and one warp a program where there are rows enough, 32 weights a thread a
            # turn; 2 warps where 1-warp programs would keep too few loads in flight (fewer than
            # 4096 long rows) and for gate/up (two loops a program): tinyllama down
            # 10.3 -> 8.4 us, gate/up 15.6 -> 14.8, the 8B's gate/up 64.8 -> 62.3; tinyllama's
            # lm_head 2 rows a turn (40.8 -> 36.0); few rows 8 warps (1024x4096 4.4 -> 3.8). H100,
            # first turn loaded before the PDL wait; scratch sweeps of session 18
            if n < 2048 and not gated:
                return 1, 2048, 8, 1, False
            if gated or (n < 4096 and k > 4096):
                return 1, 2048, 2, 1, False
            return (2, 2048, 1, 1, False) if n >= 16384 and k <= 2048 else (1, 1024, 1, 1, False)
        if batch == 2 and mid and not gated and k <= 4096:
            # CUDA cores up to 12 M weights at batch 2 (tinyllama's q/k/v and o): 2 rows and 2
            # warps a program, turns of 2048 columns up to 2048 rows (126 registers: those
            # programs fit one wave), of 1024 above. H100, timed in turn against the old choice
            # (session 22): 2048x2048 6.1 -> 4.5 us, q/k/v 6.1 -> 5.1, 5632x2048 11.0 -> 10.3;
            # 1024x4096 with 2 warps a row 6.1 -> 4.9. In tinyllama's step (profiled per kernel)
            # o took 5.3 -> 3.0 us and q/k/v 5.6 -> 5.1, but down (2048x5632), faster alone
            # (10.8 -> 10.4), was slower after gate/up (10.7 -> 11.4): it stays on tensor cores
            if n < 1024:
                return 1, 2048, 4, 1, False
            if n < 2048:
                return 1, 2048, 2, 1, False
            return 2, 2048 if n == 2048 else 1024, 2, 1, False
        if small and n <= 512:  # batches 3-8 (256x2048 at batch 8: 3.74 -> 2.94 us, session 28)
            return 2, 2048, 4, 1, False
        # tensor cores: 16 rows a program, two MMA steps a loop turn, loads a turn ahead in
        # registers (stages=1: Triton's own pipelining goes through shared memory, slower here);
        # K split where rows are few, 8 warps sharing K where K is long and rows few; 2 warps
        # where 4-warp programs would need 1.3-3 waves (5 fit an SM): the last one leaves most
        # SMs idle (14336x4096: 43 -> 39 us)
        programs = triton.cdiv(n, 16)
        warps = 8 if k >= 5000 and programs <= 256 else 2 if 640 <= programs <= 2048 and not gated else 4
        # gated: 128 registers keep 4 programs an SM (up's first loads, in flight during gate's
        # escapes, would take it to 167: 3 an SM)
        return 16, 128, warps, 4 if programs < 100 else 1, True, 1, 128 if gated else None
    if batch == 1:
        # the step's launches and single matrices, timed under PDL against 9-24 other configs each
        # (session 18): 2 rows and 2 warps mostly (tinyllama o 4.2 -> 3.3 us, down 11.2 -> 9.8, the
        # 8B's o 14.8 -> 14.1, down 43.1 -> 40.6); gate/up 4 rows a program (tinyllama 20.1 -> 17.1,
        # the 8B 82.2 -> 77.5); 2560 rows (tinyllama q/k/v) 2 rows and 4 warps (4.7; 5.6 with 2
        # warps); few rows 8 warps
        if k < 2048:
            return 1, 1024, 4, 1, False
        if n < 2048 and not gated:
            return 1, 2048, 8, 1, False
        if gated:
            return 4, 2048, 4, 1, False
        return (2, 1024, 4, 1, False) if 2048 < n < 4096 else (2, 2048, 2, 1, False)
    if batch == 2 and (small or (mid and n <= 4096 and not gated)):
        # q/k/v and down at batch 2 as well (session 22: 6.8 -> 6.5 us, 11.5 -> 11.0)
        return (2, 2048, 4, 1, False) if n <= 1024 else (4, 1024, 4, 1, False)
    if small and n <= 512:  # 256x2048 at batch 4: 2.63 -> 2.39 us, at batch 8: 4.06 -> 3.27 (session 28)
        return 2, 2048 if batch <= 4 else 1024, 4, 1, False
    if small and batch <= 4 and n <= 1024:
        return 2, 1024, 4, 1, False
    # tensor cores; K split in spans where rows alone leave SMs idle
    programs = triton.cdiv(n, 64)
    splits = 8 if programs <= 16 else 4 if programs < 256 and k > 4096 else 1
    return 64, 128 if programs >= 200 else 256, 4, splits, True


def _launch(kernel, x2d, segments, k, out, config, nibble, gated):
    """segments: one argument tuple per matrix, ending with its row count N."""
    batch = x2d.shape[0]
    rows = [segment[-1] for segment in segments]
    block_n, bk, warps, splits, use_dot, *extra = config or _config(sum(rows), k, batch, nibble, gated)
    stages, maxnreg = (extra + [3, None][len(extra):])[:2]  # optional: pipeline stages, register cap
    use_dot = batch > 1 and use_dot  # one row: CUDA cores
    if use_dot:  # tl.dot needs at least 16 rows and columns per operand; one row needs no padding
        block_n, bk = max(block_n, 16), max(bk, 16)
    else:
        splits = 1  # CUDA cores: a few rows a program fill the GPU, and _nibble_rows takes no span
    if nibble and use_dot:  # one 16-row tile of the escape tables a program, K in MMA steps of 64 columns a warp
        block_n, bk = ESCAPE_TILE, triton.cdiv(bk, 64) * 64
    elif nibble:  # a program's rows within one tile of the escape table
        block_n = min(ESCAPE_TILE, triton.next_power_of_2(block_n))
    # columns a split takes: whole tiles (the nibble MMA kernel's warps each take bk columns a tile)
    tile = bk * warps if nibble and use_dot else bk
    span = triton.cdiv(triton.cdiv(k, splits), tile) * tile
    splits = triton.cdiv(k, span)
    flags = {"B_PAD": 16 if use_dot else triton.next_power_of_2(batch), "USE_DOT": use_dot,
             "DOT_FP32": interpreting()}
    if nibble:
        # words a warp of the MMA kernel takes per split, words per row, x's row stride in 64-bit words
        scalars = (span // 4 // warps if use_dot else 0, k // 4, x2d.stride(0) // 4)
        flags["EVEN"] = all(n % block_n == 0 for n in rows) and k % (span if use_dot else bk) == 0
        flags["WARPS"] = warps
        flags.update(_nibble_flags(segments))
        # the programs load their first turn of weights before they wait for x: on CUDA cores
        # (_nibble_rows), and on tensor cores with two MMA steps a loop turn (_nibble_rows_dot)
        flags["EARLY"] = not use_dot or bk == 128
        # CUDA cores: gate and up in one loop (_nibble_rows)
        flags["PAIR"] = gated and not use_dot
    else:
        scalars = (k,)
    grid, starts, padded = _segment_grid(segments, rows, block_n, gated)
    # split K: each split's fp32 sums (gate and up side by side when gated), added up by the last
    # split of each row block to finish (_emit)
    n_out = out.shape[1]
    partials = out if splits == 1 else torch.empty(splits, batch, 2 * n_out if gated else n_out,
                                                   dtype=torch.float32, device=out.device)
    counters = arrival_counters(out.device, grid) if splits > 1 else partials
    kernel[(grid, splits)](
        x2d, out, partials, counters, *[arg for segment in padded for arg in segment], *starts, span, *scalars,
        x2d.stride(0), out.stride(0), partials.stride(-2), B=batch, BLOCK_N=block_n, BK=bk, num_warps=warps,
        num_stages=stages, maxnreg=maxnreg, SEGMENTS=len(segments), GATED=gated, SPLIT=splits, **flags,
        LATE=_late_trigger(nibble, gated, use_dot, sum(rows) * k), **pdl.launch_options(out.device),
    )
    return out


def _nibble_flags(segments) -> dict:
    """What both nibble kernels take from a launch's matrices (segments: their argument tuples,
    escape-table slots fourth): the widest of their tables, and whether weights decode by PTX byte
    permutes (NVIDIA GPUs only; the interpreter and ROCm run the integer form)."""
    return {"SLOTS": max(segment[3] for segment in segments),
            "PTX": PTX_DECODE and not interpreting() and torch.version.hip is None}


def _segment_grid(segments, rows, block_n, gated):
    """A launch's programs (axis 0), the first program of segments 1 and 2 (the grid size where
    there is no such segment), and `segments` padded to three (absent ones: never read)."""
    programs = [triton.cdiv(n, block_n) for n in rows]
    grid = programs[0] if gated else sum(programs)
    starts = [sum(programs[:i]) if i < len(programs) and not gated else grid for i in (1, 2)]
    return grid, starts, list(segments) + [segments[0]] * (3 - len(segments))


def _tma_warps(rows: int, k: int, batch: int, gated: bool, segments: int) -> int | None:
    """Warps a program of _nibble_tma_kernel takes for a nibble launch, or None where the register
    kernel stays. H100, each launch of the tinyllama and 8B decode steps alone, TMA-fed at 1, 2 and
    4 warps against the register kernel (session 26, scratch/tma_launch_ab.py), us at batch 8:
    the 8B's o 13.5 -> 12.8 (4 warps), down 40.7 -> 37.6 (4), gate/up 72.7 -> 69.6 (1), lm_head
    294 -> 277 (4); tinyllama's lm_head 44.5 -> 42.5 (4; batch 4 43.3 -> 41.4). It lost or tied on
    the smaller launches (tinyllama's q/k/v 6.4 -> 6.9, o 5.6 -> 6.0, gate/up 17.5 -> 18.6; the
    8B's q/k/v 18.4 -> 18.5): there the register kernel's first loads before its PDL wait and its
    K splits count for more.
    One matrix (of TMA_MIN_WEIGHTS or more): the warps follow its programs (16 rows each). Of
    1024 programs or more (many waves) 4 warps; of 257-1023, about one wave, 2 warps at batches
    4-8: 4-warp programs left too little in flight a wave (session 27, scratch/single_rule.py, in
    turn, us at batch 4 / 8: 5632x2048 11.1 / 11.5 -> 10.5 / 10.5, 11008x4096 30.3 / 30.7 -> 30.0
    / 29.9 (4 warps 34.3 / 34.7), 14336x4096 38.4 / 39.0 -> 37.7 / 37.8 (4 warps 38.7 / 39.3); at
    batch 2 5632x2048 lost, 10.4 -> 10.7); fewer programs 4 warps from LATE_TRIGGER_WEIGHTS
    (4096x4096, 4096x14336), above batch 4 from TMA_MIN_WEIGHTS: tinyllama's down (2048x5632)
    alone at batch 8 11.4 -> 10.9 us (batch 4 lost, 10.8 -> 11.1), its step replayed alone 864.6
    -> 874.6 steps/s (+1.15%, scratch/down_ab.py). Gate/up: 1 warp from EARLY_GATED_WEIGHTS a
    matrix.
    Batch 2 takes the same launches but the one-wave ones: the 8B's step, replayed alone in turn,
    ran 1.75% faster so (scratch/b2_tma_ab.py: 199.7 -> 203.3 steps/s), though its o alone lost
    (12.9 -> 13.0 us) while down gained (39.5 -> 37.4)."""
    if not 2 <= batch <= 8:
        return None
    weights = rows * k
    programs = triton.cdiv(rows, ESCAPE_TILE)
    if gated:
        warps = 1 if weights >= EARLY_GATED_WEIGHTS else None
    elif segments > 1 or weights < TMA_MIN_WEIGHTS:
        warps = None
    elif programs >= 1024:
        warps = 4
    elif programs > 256:
        warps = 2 if batch >= 4 else None
    else:  # fewer programs
        warps = 4 if batch > 4 or weights >= LATE_TRIGGER_WEIGHTS else None
    return warps if warps is not None and k % (128 * warps) == 0 else None


def _tma_fits(x2d: torch.Tensor, weights) -> bool:
    """Whether TMA can read this launch: Triton's descriptors, Hopper or later (or the
    interpreter), x's rows contiguous, and every buffer on a 16-byte boundary."""
    if not TMA_LOADS or TensorDescriptor is None or torch.version.hip is not None:
        return False
    if not (interpreting() or hopper_or_later(x2d.device)):
        return False
    buffers = [x2d] + [t for w in weights for t in (w.sign_mantissa, w.codes)]
    return x2d.stride(-1) == 1 and x2d.stride(0) == x2d.shape[1] and all(t.data_ptr() % 16 == 0 for t in buffers)


def _launch_tma(x2d, weights, k, out, warps, gated):
    """_nibble_tma_kernel over `weights` (NibbleGemvWeight), `warps` a program, K unsplit."""
    batch, warp_words = x2d.shape[0], k // 4 // warps  # x as 64-bit words of four bf16
    x_tiles = TensorDescriptor.from_tensor(x2d.view(torch.int64).view(batch, 1, warps, warp_words), [8, 1, warps, 32])
    segments = [(*w.tma_descriptors(warps), w.escape_table.entries, w.escape_table.slots, w.base, w.shape[0])
                for w in weights]
    rows = [w.shape[0] for w in weights]
    grid, starts, padded = _segment_grid(segments, rows, ESCAPE_TILE, gated)
    _nibble_tma_kernel[(grid,)](
        x2d, x_tiles, out, *[arg for segment in padded for arg in segment], *starts, warp_words, x2d.stride(0),
        out.stride(0), B=batch, WARPS=warps, **_nibble_flags(segments), DOT_FP32=interpreting(), STAGES=TMA_STAGES,
        SEGMENTS=len(segments), GATED=gated, LATE=_late_trigger(True, gated, True, sum(rows) * k), num_warps=warps,
        num_stages=TMA_STAGES, **pdl.launch_options(out.device))
    return out


def _late_trigger(nibble: bool, gated: bool, use_dot: bool, weights: int) -> bool:
    """Whether a launch lets the next kernel launch only after its loops (PDL; see _nibble_kernel):
    gate/up launches, but nibble's on CUDA cores of fewer than EARLY_GATED_WEIGHTS, and nibble
    launches on tensor cores of LATE_TRIGGER_WEIGHTS or more."""
    if gated:
        return not (nibble and not use_dot and weights < EARLY_GATED_WEIGHTS)
    return nibble and use_dot and weights >= LATE_TRIGGER_WEIGHTS


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] > MAX_BATCH:
        raise ValueError(f"the Triton GEMV takes at most {MAX_BATCH} rows, got {x2d.shape[0]}")
    return x2d.contiguous()


def gemv(x: torch.Tensor, weight: torch.Tensor, config=None) -> torch.Tensor:
    """x (..., K) with at most MAX_BATCH rows, weight (N, K) -> (..., N)."""
    return gemv_group(x, [weight], config=config)


def gemv_group(x: torch.Tensor, weights, gated: bool = False, config=None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Several GEMVs over one input in one launch. weights: 1-3 matrices of the same in_features,
    all plain tensors or all NibbleGemvWeight. Returns x times each, side by side along the last
    dimension ((..., N0 + N1 + N2)); with gated=True (two matrices of one shape, gate and up)
    silu(x gate^T) * (x up^T) instead, rounded as the separate bf16 ops would round."""
    nibble = isinstance(weights[0], NibbleGemvWeight)
    shapes = [tuple(w.shape) for w in weights]
    k = x.shape[-1]
    if not 1 <= len(weights) <= 3 or any(s[1] != k for s in shapes) or any(
            isinstance(w, NibbleGemvWeight) != nibble for w in weights):
        raise ValueError(f"gemv_group takes 1-3 weights of one kind with {k} input features, got {shapes}")
    if gated and (len(shapes) != 2 or shapes[0] != shapes[1] or x.dtype != torch.bfloat16):
        raise ValueError(f"a gated GEMV takes bf16 inputs and two weights of one shape, got {x.dtype}, {shapes}")
    if nibble and x.dtype != torch.bfloat16:  # the kernel reads x as 64-bit words of four bf16
        raise ValueError(f"the fused nibble GEMV takes bf16 inputs, got {x.dtype}")
    x2d = _rows(x)
    n = shapes[0][0] if gated else sum(s[0] for s in shapes)
    out = torch.empty(x2d.shape[0], n, dtype=out_dtype or x.dtype, device=x.device)
    if nibble:
        warps = _tma_warps(n, k, x2d.shape[0], gated, len(weights)) if config is None else None
        if warps is not None and _tma_fits(x2d, weights):
            _launch_tma(x2d, weights, k, out, warps, gated)
        else:
            segments = [(w.sign_mantissa, w.codes, w.escape_table.entries, w.escape_table.slots, w.base,
                         w.shape[0]) for w in weights]
            _launch(_nibble_kernel, x2d, segments, k, out, config, True, gated)
    else:
        segments = [(w.contiguous(), w.shape[0]) for w in weights]
        _launch(_plain_kernel, x2d, segments, k, out, config, False, gated)
    return out.view(*x.shape[:-1], n)


def nibble_gemv_supported(encoded) -> str | None:
    """Why the fused kernel cannot take this `nibble` weight, or None if it can."""
    from codecllm.codecs.nibble import NibbleCodec

    if len(encoded.shape) != 2 or encoded.shape[1] % 4:
        return f"the fused nibble GEMV needs a 2-D weight with in_features divisible by 4, got {tuple(encoded.shape)}"
    base = NibbleCodec._parts(encoded)[4]
    if base + ESCAPE >= 255:  # the loop's value for an escape must be a finite number
        return f"the fused nibble GEMV needs an exponent window base below {255 - ESCAPE}, got {base}"
    return None


class EscapeTable:
    """A matrix's escapes grouped by tile of ESCAPE_TILE rows, for the fused kernels: one
    int64 buffer `entries` holding, per tile, `slots` entries (the tile's first escapes, then
    zeros), then a row pointer over tiles (tiles + 1 entries) of the escapes that did not fit,
    then those. An entry packs col << 4 | row % 16 in its low 32 bits and two bf16 patterns in its
    high 32: the loop's value for the escape with its sign flipped (low half) and the true value.
    `slots` is the smallest of 16, 32, 64, 128 that leaves at most 1% of the escapes outside."""

    WIDTHS = (16, 32, 64, 128)

    def __init__(self, n: int, rows: torch.Tensor, cols: torch.Tensor, taken_out: torch.Tensor,
                 put_in: torch.Tensor):
        device = rows.device
        tiles = triton.cdiv(n, ESCAPE_TILE)
        tile = rows // ESCAPE_TILE
        count = torch.bincount(tile, minlength=tiles)
        rank = torch.arange(rows.numel(), device=device) - (torch.cumsum(count, 0) - count)[tile]
        over = [int((count - w).clamp(min=0).sum()) for w in self.WIDTHS]
        self.slots = next((w for w, o in zip(self.WIDTHS, over) if o <= rows.numel() // 100), self.WIDTHS[-1])
        low = cols * ESCAPE_TILE + rows % ESCAPE_TILE
        high = (put_in << 16) | taken_out
        packed = torch.stack([low, torch.where(high >= 2**31, high - 2**32, high)], dim=1).to(torch.int32)
        packed = packed.view(torch.int64).view(-1)
        fits = rank < self.slots
        table = torch.zeros(tiles * self.slots, dtype=torch.int64, device=device)
        table[tile[fits] * self.slots + rank[fits]] = packed[fits]
        extra = torch.zeros(tiles + 1, dtype=torch.int64, device=device)
        extra[1:] = torch.cumsum((count - self.slots).clamp(min=0), 0)
        self.entries = torch.cat([table, extra, packed[~fits]])


class NibbleGemvWeight:
    """A `nibble` EncodedTensor of shape (N, K), K divisible by 4, laid out for the fused GEMV:
    the codec's own buffers (no copy) plus its escapes grouped by 16-row tile (EscapeTable)."""

    def __init__(self, encoded):
        from codecllm.codecs.nibble import NibbleCodec

        problem = nibble_gemv_supported(encoded)
        if problem:
            raise ValueError(problem)
        n, k = encoded.shape
        sign_mantissa, codes, escape_index, escape_exponent, base = NibbleCodec._parts(encoded)
        rows, cols = escape_index // k, escape_index % k
        rest = sign_mantissa[escape_index].to(torch.int64)
        sign_and_mantissa = ((rest & 0x80) << 8) | (rest & 0x7F)  # bf16 bits but the exponent
        true_bits = sign_and_mantissa | (escape_exponent.to(torch.int64) << 7)
        loop_bits = sign_and_mantissa | ((ESCAPE + base) << 7)  # what the loops decode code 15 to
        self.shape = (n, k)
        self.sign_mantissa, self.codes, self.base = sign_mantissa, codes, base
        self.escapes = escape_index.numel()
        self.escape_table = EscapeTable(n, rows, cols, loop_bits ^ 0x8000, true_bits)
        self._tma_descriptors: dict[int, tuple] = {}

    def tma_descriptors(self, warps: int) -> tuple:
        """TMA descriptors of the sign+mantissa words and the codes for _nibble_tma_kernel at
        `warps` a program: (N, 1, warps, words a warp takes), tiles of 16 rows x 32 words a warp."""
        if warps not in self._tma_descriptors:
            n, k = self.shape
            view = (n, 1, warps, k // 4 // warps)
            self._tma_descriptors[warps] = (
                TensorDescriptor.from_tensor(self.sign_mantissa.view(torch.int32).view(view), [16, 1, warps, 32]),
                TensorDescriptor.from_tensor(self.codes.view(torch.int16).view(view), [16, 1, warps, 32]))
        return self._tma_descriptors[warps]

    @property
    def extra_nbytes(self) -> int:
        """Bytes held beyond the codec's own buffers: the escape table."""
        return self.escape_table.entries.numel() * self.escape_table.entries.element_size()

    def __call__(self, x: torch.Tensor, config=None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x (..., K) bf16 -> (..., N) in x's dtype (or `out_dtype`: fp32 skips the final rounding)."""
        return gemv_group(x, [self], config=config, out_dtype=out_dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The bf16 rows `ids` (any shape) of the weight, decoded alone: an embedding lookup
        that reads 1.5 bytes per element of the rows it needs instead of decoding the table."""
        n, k = self.shape
        flat = ids.reshape(-1)
        out = torch.empty(flat.numel(), k, dtype=torch.int16, device=self.codes.device)
        block = min(2048, triton.next_power_of_2(k))
        if flat.numel():
            table = self.escape_table
            _nibble_rows_kernel[(flat.numel(), triton.cdiv(k, block))](
                flat, self.sign_mantissa, self.codes, table.entries, table.slots, out, n, k, self.base, BLOCK=block,
                SLOTS=table.slots, num_warps=4)
        return out.view(torch.bfloat16).view(*ids.shape, k)


@triton.jit(do_not_specialize=["base"])
def _nibble_rows_kernel(ids, sign_mantissa, codes, escapes, slots, out, N, K, base, BLOCK: tl.constexpr,
                        SLOTS: tl.constexpr):
    r = tl.program_id(0)
    lo = tl.program_id(1) * BLOCK  # this program's columns: [lo, hi)
    hi = tl.minimum(lo + BLOCK, K)
    cols = lo + tl.arange(0, BLOCK)
    ok = cols < hi
    row = tl.load(ids + r).to(tl.int64)
    at = row * K + cols
    rest = tl.load(sign_mantissa + at, mask=ok, other=0).to(tl.int32)
    code = (tl.load(codes + (at >> 1), mask=ok, other=0).to(tl.int32) >> ((at & 1) * 4).to(tl.int32)) & 15
    bits = nibble_bf16_bits(rest, code + base)
    tile_escapes, extra, first_extra, last_extra = _tile_escapes(escapes, slots, row // 16, N, SLOTS)
    out_row = out + r.to(tl.int64) * K
    tl.store(out_row + cols, bits.to(tl.int16), mask=ok)
    # then this row's escapes, from its tile's slots and any beyond them: each true bf16 stored over
    # the loop's value at its column, once every thread's store above is done (a scatter of a few
    # values: comparing every column with every slot took 24 us a lookup on tinyllama's table)
    tl.debug_barrier()
    _store_escapes(out_row, tile_escapes, row, lo, hi)
    for e0 in range(first_extra, last_extra, SLOTS):
        _store_escapes(out_row, _extra_escapes(extra, e0, last_extra, SLOTS), row, lo, hi)


@triton.jit
def _store_escapes(out_row, packed, row, lo, hi):
    """Stores the true bf16 of each escape in `packed` (EscapeTable entries of its tile) that lies
    in row `row` at a column in [lo, hi) into `out_row` at its column."""
    col, row_in_tile, values = _entry_fields(packed)
    mine = (values != 0) & (row_in_tile == (row % 16).to(tl.int32)) & (col >= lo) & (col < hi)
    tl.store(out_row + col, ((values >> 16) & 0xFFFF).to(tl.int16), mask=mine)
