"""Compressed weights in host RAM, streamed to the GPU ahead of their use.

Each host-stored encoding is packed into one pinned block (`pin_packed`), so one weight is one
host-to-device copy. A `HostStreamer` issues those copies on its own CUDA stream, in the order
the weights are used, as far ahead as a byte bound allows: the copy engine works on the next weights
while the GPU decodes and computes the current ones. A block lives on the device from its copy until
the decode that reads it has run; `ahead_bytes` bounds the bytes alive at once (the host waits
for the oldest decode when the bound is reached), which bounds the device memory the stream
takes and how far the host runs ahead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from codecllm.codecs import EncodedTensor

ALIGN = 256  # bytes: every buffer of a packed block starts on this boundary


def pin_packed(encoded: EncodedTensor, pin: bool = True) -> EncodedTensor:
    """The encoding with all its buffers as views into one host block (pinned unless `pin` is
    False), so it crosses to a GPU in one copy."""
    offsets, total = {}, 0
    for name, buf in encoded.buffers.items():
        offsets[name] = total
        total += -(-buf.numel() * buf.element_size() // ALIGN) * ALIGN
    block = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=pin)
    buffers = {}
    for name, buf in encoded.buffers.items():
        buffers[name] = _view(block, offsets[name], buf)
        buffers[name].copy_(buf)
    return encoded.with_buffers(buffers)


def _view(block: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    nbytes = like.numel() * like.element_size()
    return block[offset : offset + nbytes].view(like.dtype).view(like.shape)


def packed_block(encoded: EncodedTensor) -> tuple[torch.Tensor, dict[str, int]] | None:
    """(the host bytes that hold every buffer, each buffer's byte offset in them) when the
    buffers lie tightly in one storage, as `pin_packed` lays them; None otherwise (buffers
    apart, or views into something much larger, such as a whole checkpoint). Found once per
    encoding."""
    if "packed_block" not in encoded.derived:
        encoded.derived["packed_block"] = _find_block(encoded)
    return encoded.derived["packed_block"]


def _find_block(encoded: EncodedTensor) -> tuple[torch.Tensor, dict[str, int]] | None:
    buffers = encoded.buffers
    if not buffers or any(b.device.type != "cpu" or not b.is_contiguous() for b in buffers.values()):
        return None
    storage = next(iter(buffers.values())).untyped_storage()
    if any(b.untyped_storage().data_ptr() != storage.data_ptr() for b in buffers.values()):
        return None
    starts = {name: b.storage_offset() * b.element_size() for name, b in buffers.items()}
    first = min(starts.values())
    end = max(starts[name] + b.numel() * b.element_size() for name, b in buffers.items())
    if end - first > sum(b.numel() * b.element_size() + ALIGN for b in buffers.values()) or any(
        (starts[name] - first) % b.element_size() for name, b in buffers.items()
    ):
        return None
    block = torch.empty(0, dtype=torch.uint8).set_(storage)[first:end]
    return block, {name: start - first for name, start in starts.items()}


def copy_to_device(encoded: EncodedTensor, device: torch.device) -> tuple[EncodedTensor, torch.Tensor | None]:
    """The encoding on `device`, copied asynchronously on the current stream: its packed block in
    one copy where it has one (returned too), else buffer by buffer (block None)."""
    packed = packed_block(encoded)
    if packed is None:
        return encoded.to(device, non_blocking=True), None
    host, offsets = packed
    block = torch.empty_like(host, device=device)
    block.copy_(host, non_blocking=True)
    views = {name: _view(block, offsets[name], buf) for name, buf in encoded.buffers.items()}
    return encoded.with_buffers(views), block


def capturable_copy(encoded: EncodedTensor) -> bool:
    """Whether a CUDA graph can hold the copy of this host-stored encoding: one pinned block
    (a captured copy from pageable memory fails)."""
    packed = packed_block(encoded)
    return packed is not None and packed[0].is_pinned()


@dataclass
class _Copy:
    block: torch.Tensor  # the device block
    encoded: EncodedTensor  # views into it
    ready: torch.cuda.Event  # recorded on the copy stream after the copy
    nbytes: int


class HostStreamer:
    """Copies host-stored encodings to one CUDA device on a stream of their own, ahead of use.

    At most `ahead_bytes` of blocks are alive on the device at once (at least two, whatever
    their size): issued, waiting, or being read by a decode.
    """

    def __init__(self, device: torch.device, ahead_bytes: int = 256 * 2**20):
        self.device, self.ahead_bytes = device, ahead_bytes
        self.stream = torch.cuda.Stream(device)
        self._issued: dict[int, _Copy] = {}  # copies issued, not yet taken
        self._reading: deque[tuple[torch.cuda.Event, int]] = deque()  # taken: (after its decode, bytes)
        self._alive_bytes = 0
        self.copies = 0
        self.bytes_copied = 0

    def _retire(self) -> None:
        while self._reading and self._reading[0][0].query():
            self._alive_bytes -= self._reading.popleft()[1]

    def has_room(self, nbytes: int) -> bool:
        """Whether a block of `nbytes` may be issued now, after waiting for earlier decodes to
        finish where that makes room (the host never runs further ahead than the bound)."""
        self._retire()
        while len(self._issued) + len(self._reading) >= 2 and self._alive_bytes + nbytes > self.ahead_bytes:
            if not self._reading:
                return False  # the bound is held by copies not yet taken: wait for their turn
            event, size = self._reading.popleft()
            event.synchronize()
            self._alive_bytes -= size
        return True

    def is_issued(self, key: int) -> bool:
        return key in self._issued

    @staticmethod
    def size_of(encoded: EncodedTensor) -> int:
        """Bytes one copy of `encoded` moves."""
        packed = packed_block(encoded)
        return packed[0].numel() if packed is not None else encoded.nbytes

    def issue(self, key: int, encoded: EncodedTensor) -> None:
        """Start copying `encoded` (host RAM) to the device, unless already under way."""
        if key in self._issued:
            return
        with torch.cuda.stream(self.stream):
            device_encoded, block = copy_to_device(encoded, self.device)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        size = self.size_of(encoded)
        self._issued[key] = _Copy(block, device_encoded, ready, size)
        self._alive_bytes += size
        self.copies += 1
        self.bytes_copied += size

    @contextmanager
    def use(self, key: int, encoded: EncodedTensor) -> Iterator[EncodedTensor]:
        """The device copy of `encoded` (issued now if it was not), for work queued on the current
        stream inside the `with` block; the block is retired once that work has run."""
        self.issue(key, encoded)
        copy = self._issued.pop(key)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copy.ready)
        # The allocator must not hand the block out again before the current stream has read it.
        for buf in ([copy.block] if copy.block is not None else copy.encoded.buffers.values()):
            buf.record_stream(current)
        try:
            yield copy.encoded
        finally:
            event = torch.cuda.Event()
            event.record(current)
            self._reading.append((event, copy.nbytes))

    def clear(self) -> None:
        """Drop every copy issued and not taken (a captured pass copies for itself)."""
        for key in list(self._issued):
            self.forget(key)

    def forget(self, key: int) -> None:
        """Drop an issued copy (its encoding changed)."""
        copy = self._issued.pop(key, None)
        if copy is not None:
            self._alive_bytes -= copy.nbytes
