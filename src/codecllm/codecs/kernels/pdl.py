"""Programmatic dependent launch (PDL) for the decode step's kernels, on Hopper GPUs and later.

A decode step is a chain of short kernels (tinyllama: eight a layer, about 180 a step), and each
normally starts only after the one before has ended: the GPU sits idle while the next kernel is
launched and its programs are placed. Launched with PDL, a kernel may start while the one before
still runs: its programs wait on the GPU (`wait_for_inputs`, griddepcontrol.wait) until that
kernel has ended and its writes are visible. Each kernel says when the next may launch
(`launch_next`): the step's kernels do so right after their wait (so at most one kernel waits
ahead of the one running), except the gate/up GEMV and the large nibble GEMVs on tensor cores,
which do so after their loops (see gemv.py).

What a kernel may read before its wait: anything but what the kernel launched right before it
writes. It was launched only once every program of that kernel had called `launch_next`, each
after its own wait, so every kernel before that one has ended (a kernel launched without PDL,
as torch's are, lets the next start only when it ends). Model weights, the KV cache's earlier
positions, the step's cos/sin rows and the counters the previous step's last kernel moved on are
all ready then. The nibble GEMVs load their first weights there, RMSNorm its weight, RoPE its
cos/sin row and the slot, and decode attention its slot while `prefetch_to_l2` brings its run of
cache rows and mask into L2 (rope_kv_write, the kernel before it, writes the newest row into L2,
where the prefetched line takes the write). H100, 256 replays of the step graph timed in turn
(session 24): tinyllama batch 1 bf16 +3.2%, nibble +1.6%; batch 4 +2.7% / +2.2%; the 8B batch 1
+1.4% / +1.7%.

Results are unchanged (the same kernels in the same order; the GPU tests compare bits and
tokens). On an H100 tinyllama's decode steps run 1-11% faster at batches 1-8, the 8B's (long
GEMVs) 2% at batch 1 (benchmarks/decode.py, NOTES.md). CODECLLM_PDL=0 launches the plain way.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from codecllm.codecs.kernels_available import hopper_or_later, interpreting

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: plain launches
    gdc_launch_dependents = gdc_wait = None


def switched_on() -> bool:
    return os.environ.get("CODECLLM_PDL", "1") != "0"


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA GPU of compute capability 9.0 or
    later, a Triton that has it, not the CPU interpreter, and CODECLLM_PDL not 0."""
    return gdc_wait is not None and not interpreting() and switched_on() and hopper_or_later(device)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for launching a kernel that takes a PDL constexpr."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Everything the kernel before wrote is visible after this. Call it before any write, and
    before any read of what the kernel launched right before may write (see the module's notes
    on what may be read earlier)."""
    if PDL:
        gdc_wait()


@triton.jit
def launch_next(PDL: tl.constexpr):
    """The next kernel may launch once every program of this one has called this (or ended)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def prefetch_to_l2(start, count, WARPS: tl.constexpr, ON: tl.constexpr):
    """Ask L2 for the `count` elements from pointer `start` (any alignment; nothing for count <= 0):
    one bulk prefetch a warp of the program's WARPS (the instruction is issued a warp at a time,
    from uniform registers: lanes that asked for different bytes would each take a turn). Only a
    hint: nothing reaches registers, and writes land in L2, so a later write to these bytes still
    wins. ON: Hopper's cp.async.bulk.prefetch; off, nothing (pass the kernel's PDL flag: it is on
    only where that instruction exists, and off in the interpreter)."""
    if ON:
        warp = tl.arange(0, 32 * WARPS) // 32  # a 1-D block of 32 * WARPS elements: one a thread
        nbytes = count * (start.dtype.element_ty.primitive_bitwidth // 8)
        chunk = tl.cdiv(tl.cdiv(nbytes, WARPS), 16) * 16
        first = warp * chunk
        size = tl.maximum(tl.minimum(chunk, nbytes - first), 0)
        # the chunk widened to 16-byte bounds, as the instruction needs
        tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            .reg .b64 a, e, n;
            .reg .b32 s;
            setp.gt.s32 p, $2, 0;
            cvt.s64.s32 n, $2;
            add.s64 e, $1, n;
            add.s64 e, e, 15;
            and.b64 e, e, -16;
            and.b64 a, $1, -16;
            sub.s64 n, e, a;
            cvt.u32.u64 s, n;
            @p cp.async.bulk.prefetch.L2.global [a], s;
            mov.u32 $0, 0;
            }""",
            "=r,l,r", [start.to(tl.pointer_type(tl.uint8)) + first, size], dtype=tl.int32, is_pure=False,
            pack=1)
