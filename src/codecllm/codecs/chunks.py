"""Chunked iteration, so encoders and CPU decoders hold bounded temporaries on huge tensors."""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK = 1 << 22  # elements per chunk: int64 temporaries stay around 32 MiB; even by design


def chunks(numel: int, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, size):
        yield start, min(start + size, numel)


def index_dtype(limit: int) -> torch.dtype:
    """The narrowest signed integer dtype holding indices up to `limit`."""
    return torch.int32 if limit < 2**31 else torch.int64
