"""Triton kernels for the decode step's elementwise ops (see `fused.py` for when they run):
RMSNorm, residual add + RMSNorm, RoPE, SiLU(gate) * up, one kernel each; for a decode token
RoPE of q and k with the KV-cache write in one kernel, attention over the filled cache slots,
and the end of a CUDA-graph step (greedy pick, counters, next mask column) in one kernel.

Every kernel rounds exactly where the PyTorch code it replaces rounds (bf16 after each op, fp32
inside RMSNorm), with round-to-nearest-even done by integer ops and results stored as raw
bf16 bits. So RoPE and SiLU*up are bit-identical to the eager ops; RMSNorm differs only in the
order of its fp32 sum of squares. Imported only where they run: Triton is optional.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from codecllm.codecs.kernels.arrivals import arrival_counters, last_to_arrive
from codecllm.codecs.kernels.bf16 import bf16_round as _bf16_round
from codecllm.codecs.kernels.bf16 import load_bf16 as _load_bf16
from codecllm.codecs.kernels.bf16 import silu_times
from codecllm.codecs.kernels.bf16 import store_bf16 as _store_bf16
from codecllm.codecs.kernels.pdl import launch_next, launch_options, prefetch_to_l2, wait_for_inputs
from codecllm.codecs.kernels_available import interpreting, sm_count


@triton.jit
def _rms_norm_kernel(x, delta, weight, out, summed, D, eps, ADD: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    scale_by = _load_bf16(weight + cols, ok)  # a model weight: read before the wait (see pdl.py)
    wait_for_inputs(PDL)
    launch_next(PDL)
    row = tl.program_id(0).to(tl.int64) * D
    v = _load_bf16(x + row + cols, ok)
    if ADD:  # the residual stream: x + delta, rounded to bf16 as the eager add does
        v = _bf16_round(v + _load_bf16(delta + row + cols, ok))
        _store_bf16(summed + row + cols, v, ok)
    scale = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps)
    normed = _bf16_round(v * scale)  # F.rms_norm in fp32, then .to(bf16)
    _store_bf16(out + row + cols, normed * scale_by, ok)


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.shape[-1])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x.float()).to(bf16), over the last dimension."""
    rows = _rows_of(x)
    out = torch.empty_like(rows)
    d = rows.shape[1]
    _rms_norm_kernel[(rows.shape[0],)](rows, rows, weight, out, out, d, eps, ADD=False,
                                       BLOCK=triton.next_power_of_2(d), num_warps=_warps(d),
                                       **launch_options(x.device))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + delta, rms_norm(x + delta)) in one pass: the residual add and the next norm."""
    rows, delta_rows = _rows_of(x), _rows_of(delta)
    out, summed = torch.empty_like(rows), torch.empty_like(rows)
    d = rows.shape[1]
    _rms_norm_kernel[(rows.shape[0],)](rows, delta_rows, weight, out, summed, d, eps, ADD=True,
                                       BLOCK=triton.next_power_of_2(d), num_warps=_warps(d),
                                       **launch_options(x.device))
    return summed.view(x.shape), out.view(x.shape)


def _warps(d: int) -> int:
    # one program a row: at batch 1 one program does the whole norm, so more warps (each lane's
    # share loaded at once, a shorter sum) win. H100, chains of 20 add+norm launches under PDL:
    # d = 2048 1.68 us a launch with 4 warps, 1.53 with 8, 1.58 with 16; d = 4096 2.03 with 8,
    # 2.12 with 16; 1 or 2 warps 2-3x slower (scratch A/B, session 21)
    return 8 if d >= 2048 else 4 if d >= 1024 else 1


@triton.jit
def _rope_table(cos, sin, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr):
    """A token's cos and sin row (pointers), as _rotate takes them: both halves of each."""
    cols = tl.arange(0, HALF_BLOCK)
    ok = cols < HALF
    return (_load_bf16(cos + cols, ok), _load_bf16(sin + cols, ok), _load_bf16(cos + HALF + cols, ok),
            _load_bf16(sin + HALF + cols, ok))


@triton.jit
def _rotate(src, dst, table, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr):
    """One head: dst = src * cos + rotate_half(src) * sin, rounded after each op as the eager
    bf16 code does; `table` is the token's cos and sin (_rope_table)."""
    c1, s1, c2, s2 = table
    cols = tl.arange(0, HALF_BLOCK)
    ok = cols < HALF
    first, second = _load_bf16(src + cols, ok), _load_bf16(src + HALF + cols, ok)
    _store_bf16(dst + cols, _bf16_round(first * c1) + _bf16_round(-second * s1), ok)
    _store_bf16(dst + HALF + cols, _bf16_round(second * c2) + _bf16_round(first * s2), ok)


@triton.jit
def _rope_kernel(x, cos, sin, out, H, T, stride_b, stride_h, stride_t, cs_stride_b,
                 D: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = pid % T
    h = (pid // T) % H
    b = pid // (T * H)
    table = b.to(tl.int64) * cs_stride_b + t * D
    _rotate(x + b.to(tl.int64) * stride_b + h * stride_h + t * stride_t, out + pid.to(tl.int64) * D,
            _rope_table(cos + table, sin + table, HALF, HALF_BLOCK), HALF, HALF_BLOCK)


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
def _rope_kv_kernel(q, k, v, cos, sin, q_out, k_cache, v_cache, slot, H, HKV, L, stride_qb, stride_kb,
                    stride_vb, cs_stride_b, D: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    # One program per (sequence, head): query heads are rotated into q_out, key heads rotated
    # straight into the cache at `slot` (read on the device, so a CUDA graph can replay this),
    # value heads copied there. The cos and sin row and the slot are read before the wait: no
    # kernel of the step writes them right before this one (see pdl.py).
    pid = tl.program_id(0)
    b = pid // (H + HKV)
    h = pid % (H + HKV)
    table = b.to(tl.int64) * cs_stride_b
    rows = _rope_table(cos + table, sin + table, HALF, HALF_BLOCK)
    at_slot = tl.load(slot)
    wait_for_inputs(PDL)
    launch_next(PDL)
    if h < H:
        _rotate(q + b.to(tl.int64) * stride_qb + h * D, q_out + (b * H + h).to(tl.int64) * D, rows, HALF,
                HALF_BLOCK)
    else:
        kv_head = h - H
        at = ((b * HKV + kv_head).to(tl.int64) * L + at_slot) * D
        _rotate(k + b.to(tl.int64) * stride_kb + kv_head * D, k_cache + at, rows, HALF, HALF_BLOCK)
        cols = tl.arange(0, 2 * HALF_BLOCK)
        ok = cols < D
        row = tl.load((v + b.to(tl.int64) * stride_vb + kv_head * D + cols).to(tl.pointer_type(tl.uint16)), mask=ok)
        tl.store((v_cache + at + cols).to(tl.pointer_type(tl.uint16)), row, mask=ok)


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """One decode token: q (B, 1, H, D), k, v (B, 1, Hkv, D), each with unit stride inside a
    token's row (views into one fused q/k/v output are fine); cos, sin (B, 1, 1, D). Writes
    rope(k) and v at position slot[0] of k_cache, v_cache (B, Hkv, L, D, contiguous: one layer of
    a KVCache) and returns rope(q) as (B, H, 1, D). The same bits as apply_rope + index_copy_."""
    b, _, h, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.stride(-2) != d:
            raise ValueError(f"rope_kv_write needs each token's heads contiguous, got strides {t.stride()}")
    cos, sin = cos.expand(b, 1, 1, d).contiguous(), sin.expand(b, 1, 1, d).contiguous()
    q_out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    _rope_kv_kernel[(b * (h + hkv),)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, slot, h, hkv, length, q.stride(0), k.stride(0), v.stride(0),
        cos.stride(0), D=d, HALF=d // 2, HALF_BLOCK=triton.next_power_of_2(d // 2), num_warps=1,
        **launch_options(q.device))
    return q_out


@triton.jit
def _silu_mul_kernel(gate, up, out, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    launch_next(PDL)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    _store_bf16(out + i, silu_times(_load_bf16(gate + i, ok), _load_bf16(up + i, ok)), ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 1024
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4,
                                               **launch_options(gate.device))
    return out


@triton.jit
def _attend(k, v, mask, b, cache, qt, heads, dims, begin, end, mask_stride_b, scale, G_PAD: tl.constexpr,
            D: tl.constexpr, BLOCK: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax of the (G_PAD, D) queries `qt` over cache positions begin..end - 1:
    (row max, row sum, unnormalised output)."""
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for start in range(begin, end, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        ok = pos < end
        kt = tl.load(k + cache + pos[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
        vt = tl.load(v + cache + pos[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
        if DOT_FP32:
            scores = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(qt, tl.trans(kt))  # bf16 products are exact in the fp32 sum
        bias = tl.load(mask + b.to(tl.int64) * mask_stride_b + pos, mask=ok, other=float("-inf")).to(tl.float32)
        scores = scores * scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet (left padding)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _decode_attention_kernel(q, k, v, mask, slot, out, part_acc, part_ml, arrivals, L, mask_stride_b, scale,
                             HKV: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                             BLOCK: tl.constexpr, SPLITS: tl.constexpr, MIN_RUN: tl.constexpr,
                             SPLIT_FROM: tl.constexpr, DOT_FP32: tl.constexpr, WARPS: tl.constexpr,
                             PDL: tl.constexpr):
    # Program (i, s), i = (sequence, KV head), attends its GROUP query heads to the s-th run of
    # cache positions 0..slot. Under SPLIT_FROM positions there is one run; from there on runs
    # are whole BLOCKs, as even as may be, at least MIN_RUN long, so fewer than SPLITS of them
    # may be used (programs past them do nothing). With one run its program stores the output;
    # with more, each stores its partial (max, sum, unnormalised output) and the last program of
    # i to arrive merges them in run order. A fixed order and no float atomics: the same inputs
    # give the same bits on every run.
    # Before the wait (see pdl.py): the slot, and L2 warmed with the run's cache rows and mask
    # (rope_kv_write, the kernel before, writes only the newest row, and into L2).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = tl.load(slot).to(tl.int32) + 1
    run = tl.maximum(tl.cdiv(tl.cdiv(n, SPLITS), BLOCK) * BLOCK, MIN_RUN)
    run = tl.where(n < SPLIT_FROM, n, run)
    runs = tl.cdiv(n, run)
    begin = split * run
    end = tl.minimum(begin + run, n)
    cache = pid.to(tl.int64) * L * D
    prefetch_to_l2(k + cache + begin * D, (end - begin) * D, WARPS, PDL)
    prefetch_to_l2(v + cache + begin * D, (end - begin) * D, WARPS, PDL)
    b = pid // HKV
    prefetch_to_l2(mask + b.to(tl.int64) * mask_stride_b + begin, end - begin, WARPS, PDL)
    wait_for_inputs(PDL)
    launch_next(PDL)
    if split < runs:
        heads = tl.arange(0, G_PAD)
        dims = tl.arange(0, D)
        q_rows = pid * GROUP + heads  # q is (B, HKV * GROUP, 1, D)
        head_ok = heads < GROUP
        qt = tl.load(q + q_rows[:, None] * D + dims[None, :], mask=head_ok[:, None], other=0.0)
        if DOT_FP32:
            qt = qt.to(tl.float32)
        m_i, l_i, acc = _attend(k, v, mask, b, cache, qt, heads, dims, begin, end, mask_stride_b, scale, G_PAD, D,
                                BLOCK, DOT_FP32)
        outs = out + q_rows[:, None] * D + dims[None, :]
        if runs == 1:
            _store_bf16(outs, acc / l_i[:, None], head_ok[:, None])
        else:
            part = pid * SPLITS + split
            tl.store(part_acc + (part * G_PAD + heads[:, None]) * D + dims[None, :], acc)
            tl.store(part_ml + 2 * part * G_PAD + heads, m_i)
            tl.store(part_ml + (2 * part + 1) * G_PAD + heads, l_i)
            if last_to_arrive(arrivals, pid, runs):
                _merge(part_acc, part_ml, pid * SPLITS, runs, heads, dims, outs, head_ok, G_PAD, D, SPLITS)
                tl.atomic_xchg(arrivals + pid, 0)  # zero again for the next launch


@triton.jit
def _merge(part_acc, part_ml, first, runs, heads, dims, outs, head_ok, G_PAD: tl.constexpr, D: tl.constexpr,
           SPLITS: tl.constexpr):
    """Store sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max m), over the `runs` partials
    from `first` on, in run order (loads past `runs` are masked off: no memory traffic). Merged
    online, like the softmax itself, so no load waits for another: one round trip to L2."""
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    total = tl.zeros((G_PAD,), tl.float32)
    merged = tl.zeros((G_PAD, D), tl.float32)
    for s in tl.static_range(SPLITS):
        on = heads * 0 + s < runs  # (G_PAD,): the interpreter takes no scalar mask
        ml = part_ml + 2 * (first + s) * G_PAD + heads
        m_s = tl.load(ml, mask=on, other=float("-inf"), cache_modifier=".cg")  # -inf: nothing visible
        l_s = tl.load(ml + G_PAD, mask=on, other=0.0, cache_modifier=".cg")
        a = tl.load(part_acc + ((first + s) * G_PAD + heads[:, None]) * D + dims[None, :], mask=on[:, None],
                    other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        old, new = tl.exp(m - m_safe), tl.exp(m_s - m_safe)
        total = total * old + l_s * new
        merged = merged * old[:, None] + a * new[:, None]
        m = m_new
    _store_bf16(outs, merged / total[:, None], head_ok[:, None])


def decode_attention_fits(q: torch.Tensor, k_cache: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `decode_attention` takes these: one bf16 query token, a power-of-two head size of
    at least 16, and an additive bf16 mask (B, 1, 1, L) as the CUDA-graph decode step builds."""
    d = q.shape[-1]
    return (q.shape[2] == 1 and q.dtype == torch.bfloat16 and d >= 16 and d & (d - 1) == 0 and mask is not None
            and mask.dtype == q.dtype and mask.shape[1:3] == (1, 1) and mask.shape[-1] == k_cache.shape[2]
            and mask.stride(-1) == 1 and q.shape[1] % k_cache.shape[1] == 0)


# Loop turns of 128 positions, 3 stages, 4 warps: the fastest at 128-1024 positions of the
# BLOCK 32-256 x stages 1-4 x warps 4/8 swept on an H100 (NOTES.md, nineteenth session).
ATTENTION_BLOCK = 128  # cache positions a loop turn
# The merge of split runs costs about what 230 positions do (H100: ~2.3 us), so a cache is split
# only from 512 filled positions on, in runs of at least 256.
ATTENTION_SPLIT_FROM = 512
ATTENTION_MIN_RUN = 256
ATTENTION_STAGES = 3
ATTENTION_WARPS = 4


def attention_splits(programs: int, length: int, device: torch.device) -> int:
    """How many runs of positions each (sequence, KV head) may be split into, for `programs`
    (sequence, KV head) pairs and a cache of `length` positions: about one program an SM (one a
    pair left all but 4 of an H100's 132 SMs idle on tinyllama at batch 1), a power of two, at
    most one per ATTENTION_MIN_RUN positions and 16; 1 for a cache too short to be split. How
    many runs a launch uses depends on how much of the cache is filled (the kernel)."""
    if length < ATTENTION_SPLIT_FROM:
        return 1
    want = min(triton.cdiv(sm_count(device), programs), length // ATTENTION_MIN_RUN, 16)
    return 1 << (want.bit_length() - 1)  # the power of two at or below


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor,
                     slot: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v over cache positions 0..slot[0] only (a decode step's
    attention without reading the empty tail of a static cache). q (B, H, 1, D) contiguous;
    k_cache, v_cache (B, Hkv, L, D) contiguous, H a multiple of Hkv (grouped heads); mask
    additive (B, 1, 1, L). Returns (B, H, 1, D). The filled positions are split into `splits`
    runs (a power of two; default: `attention_splits`) attended in parallel and merged."""
    b, h, _, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    group, g_pad, block = h // hkv, max(16, triton.next_power_of_2(h // hkv)), ATTENTION_BLOCK
    if splits is None:
        splits = attention_splits(b * hkv, length, q.device)
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"splits={splits}: must be a power of two >= 1")
    arrivals = arrival_counters(q.device, b * hkv)
    parts = b * hkv * splits if splits > 1 else 0  # each run's (G_PAD, D) output, then its max and sum
    part_acc = torch.empty(max(parts * g_pad * d, 1), dtype=torch.float32, device=q.device)
    part_ml = torch.empty(max(parts * 2 * g_pad, 1), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _decode_attention_kernel[(b * hkv, splits)](
        q.contiguous(), k_cache, v_cache, mask, slot, out, part_acc, part_ml, arrivals, length, mask.stride(0),
        1.0 / d**0.5, HKV=hkv, GROUP=group, G_PAD=g_pad, D=d, BLOCK=block, SPLITS=splits,
        MIN_RUN=max(block, ATTENTION_MIN_RUN // block * block), SPLIT_FROM=ATTENTION_SPLIT_FROM,
        DOT_FP32=interpreting(), WARPS=ATTENTION_WARPS, num_warps=ATTENTION_WARPS, num_stages=ATTENTION_STAGES,
        **launch_options(q.device))
    return out


# A decode step's greedy pick: one program per ARGMAX_BLOCK logits of a sequence, merged by the
# last program to arrive, which also moves the step's state on (see finish_step).
ARGMAX_BLOCK = 4096
_INT32_MIN = tl.constexpr(-2147483648)
_INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _argmax_key(v):
    """int32 keys ordered as torch.argmax orders fp32 values: -0.0 as +0.0, NaN above everything
    (torch's max propagates NaN)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(bits == _INT32_MIN, 0, bits)  # -0.0 -> +0.0
    key = bits ^ ((bits >> 31) & _INT32_MAX)  # negative values: larger magnitude, smaller key
    return tl.where(v != v, _INT32_MAX, key)


@triton.jit
def _finish_step_kernel(logits, token, position, slot, mask, padding, part_key, part_index, arrivals, V, L,
                        stride_lb, B: tl.constexpr, B_PAD: tl.constexpr, SPLITS: tl.constexpr,
                        S_PAD: tl.constexpr, BLOCK: tl.constexpr, GREEDY: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    launch_next(PDL)
    pid = tl.program_id(0)
    programs = 1
    if GREEDY:  # this program's best (key, first index) of its BLOCK logits
        programs = B * SPLITS
        cols = (pid % SPLITS) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < V
        v = tl.load(logits + (pid // SPLITS) * stride_lb + cols, mask=ok, other=0).to(tl.float32)
        key = tl.where(ok, _argmax_key(v), _INT32_MIN)  # below every value's key (-inf: -2139095041)
        best = tl.max(key, axis=0)
        tl.store(part_key + pid, best)
        tl.store(part_index + pid, tl.min(tl.where(key == best, cols, _INT32_MAX), axis=0))
    if last_to_arrive(arrivals, 0, programs):
        batch = tl.arange(0, B_PAD)
        live = batch < B
        if GREEDY:  # the best of each sequence's blocks; ties: the first index, as torch.argmax
            s = tl.arange(0, S_PAD)
            at = batch[:, None] * SPLITS + s[None, :]
            ours = live[:, None] & (s < SPLITS)[None, :]
            keys = tl.load(part_key + at, mask=ours, other=_INT32_MIN, cache_modifier=".cg")
            first = tl.load(part_index + at, mask=ours, other=_INT32_MAX, cache_modifier=".cg")
            top = tl.max(keys, axis=1)
            picked = tl.min(tl.where(keys == top[:, None], first, _INT32_MAX), axis=1)
            tl.store(token + batch, picked.to(tl.int64), mask=live)
        tl.store(position + batch, tl.load(position + batch, mask=live) + 1, mask=live)
        now = tl.load(slot + batch * 0, mask=batch == 0, other=0)  # (B_PAD,): the interpreter takes no scalar mask
        tl.store(slot + batch * 0, now + 1, mask=batch == 0)
        # the next step sees one more cache position: the one this step's token goes to
        next_slot = batch * 0 + tl.max(now, axis=0) + 1
        opens = live & (next_slot < L)
        real = tl.load(padding + batch * L + next_slot, mask=opens, other=0) != 0
        tl.store(mask + batch * L + next_slot,
                 tl.where(real, 0.0, float("-inf")).to(mask.dtype.element_ty), mask=opens)
        tl.atomic_xchg(arrivals + 0, 0)  # zero again for the next launch


def finish_step(logits: torch.Tensor, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor,
                mask: torch.Tensor, padding: torch.Tensor, greedy: bool) -> None:
    """The end of a CUDA-graph decode step in one launch: with `greedy`, token (B, 1) =
    logits.argmax(-1) (logits (B, V); the first index of the largest value, NaN largest, as torch);
    then position (B, 1) += 1, slot (1,) += 1, and the additive mask (B, 1, 1, L) opens the new
    slot's column where padding (B, L) marks a real token. Replaces an argmax, two adds and a
    rebuild of the mask (about eight small kernels; H100, tinyllama batch 1: see NOTES.md)."""
    b, v = logits.shape
    length = mask.shape[-1]
    splits = triton.cdiv(v, ARGMAX_BLOCK)
    parts = b * splits if greedy else 1
    part_key = torch.empty(parts, dtype=torch.int32, device=logits.device)
    part_index = torch.empty(parts, dtype=torch.int32, device=logits.device)
    _finish_step_kernel[(parts,)](
        logits, token, position, slot, mask, padding.view(torch.uint8), part_key, part_index,
        arrival_counters(logits.device, 1), v, length, logits.stride(0), B=b, B_PAD=triton.next_power_of_2(b),
        SPLITS=splits, S_PAD=triton.next_power_of_2(splits), BLOCK=ARGMAX_BLOCK, GREEDY=greedy, num_warps=4,
        **launch_options(logits.device))
