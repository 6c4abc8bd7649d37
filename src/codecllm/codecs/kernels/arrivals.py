"""Arrival counts: how one program of a launch learns it is the last of a group to finish, so it
can combine the others' results in the same launch (split-K GEMVs, split decode attention, the
step end's argmax) instead of a second launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, programs: int) -> torch.Tensor:
    """int32 zeros, at least `programs` of them, kept per device: split launches (split-K GEMVs,
    split positions in the decode attention) count their arrivals in them and set them back to
    zero before they end, so one buffer serves every launch on the device's streams in turn
    (launches of one stream never overlap)."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < programs:
        have = _COUNTERS[device] = torch.zeros(max(1024, triton.next_power_of_2(programs)), dtype=torch.int32,
                                               device=device)
    return have


@triton.jit
def last_to_arrive(counters, index, arrivals):
    """Whether this program is the last of `arrivals` to count itself in `counters[index]`
    (`arrival_counters`). Every thread's stores come before one thread releases them at GPU scope
    with the count, and the last to arrive acquires them all: it may then read the others' results
    (from L2, `.cg`: another SM wrote them) and must set the count back to zero."""
    tl.debug_barrier()
    return tl.atomic_add(counters + index, 1, sem="acq_rel", scope="gpu") == arrivals - 1
