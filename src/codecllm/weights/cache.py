"""The weight cache: which decompressed weights to keep, prefetching, and exact statistics.

One cache per model (no global state). A compressed module asks `cache.get(weight, device)` at
forward time; the root module's forward pre-hook calls `cache.begin_pass()`.

Policies (`parse_policy`):
  none        decompress at every use, free right after
  per-pass    decompress once per forward pass, drop everything when the next pass starts
  lru:K       keep the K most recently used across passes
  pin:K       keep the first K weights used, for good (on a cyclic scan: hit rate K/N)
  auto[:B]    keep weights while they fit in a byte budget B (e.g. 512MB, 0 by default) and,
              on CUDA, decompress the next weight on a side stream while the current one computes
              (inside a captured decode step too)
  all         decompress once, keep everything
  fused       never keep a decompressed copy: `nibble` weights are decoded inside the GEMV for
              inputs of at most 8 rows (decode steps, on CUDA); larger inputs and other codecs
              decompress per use, as `none`
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from codecllm.codecs import EncodedTensor, decode
from codecllm.errors import CacheError
from codecllm.weights.offload import HostStreamer, capturable_copy, copy_to_device

POLICIES = ("none", "per-pass", "lru:K", "pin:K", "auto[:BYTES]", "all", "fused")
# Policies whose work per forward pass is the same every pass once warm, so a CUDA graph of one
# decode step replays them faithfully (lru decides anew at every access). auto's kept set is
# fixed by the end of the first pass (it only adds weights while they fit), and a captured pass
# prefetches within itself only: the side-stream decodes fork from and join the captured stream.
GRAPH_SAFE = ("none", "per-pass", "pin", "all", "fused", "auto")
CAPTURED_COPIES_AHEAD = 2  # host-RAM weights copied ahead of their decode in a captured pass
COUNTERS = ("forward_passes", "decompressions", "hits", "misses", "prefetch_hits", "fused_calls",
            "bytes_decoded", "bytes_transferred")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Policy:
    kind: str  # none | per-pass | lru | pin | auto | all
    count: int = 0  # K for lru/pin
    budget: int = 0  # bytes for auto

    def __str__(self) -> str:
        if self.kind in ("lru", "pin"):
            return f"{self.kind}:{self.count}"
        if self.kind == "auto":
            return f"auto:{self.budget}B"
        return self.kind


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise CacheError(f"cannot read {text!r} as a size; write e.g. 512MB, 2GiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_policy(spec: str | Policy) -> Policy:
    """'lru:20' -> Policy('lru', count=20). Raises CacheError naming the valid forms."""
    if isinstance(spec, Policy):
        return spec
    text = str(spec).strip().lower()
    name, _, arg = text.partition(":")
    if name in ("none", "per-pass", "all", "fused") and not arg:
        return Policy(name)
    if name in ("lru", "pin") and arg:
        if not arg.isdigit():
            raise CacheError(f"cache policy {spec!r}: {name} takes a whole number of layers, e.g. {name}:20")
        return Policy(name, count=int(arg))
    if name == "auto":
        return Policy("auto", budget=parse_bytes(arg) if arg else 0)
    raise CacheError(f"unknown cache policy {spec!r}; choose one of: {', '.join(POLICIES)}")


class CompressedWeight:
    """One compressed weight matrix as the cache sees it: its encoding, a key, a name."""

    def __init__(self, encoded: EncodedTensor, name: str):
        self.encoded = encoded
        self.name = name
        self.nbytes = encoded.original_nbytes
        self._sized: EncodedTensor | None = None
        self._compressed_nbytes = 0

    @property
    def compressed_nbytes(self) -> int:
        if self._sized is not self.encoded:  # computed once per encoding (it serialises the metadata)
            self._sized, self._compressed_nbytes = self.encoded, self.encoded.nbytes
        return self._compressed_nbytes


class WeightCache:
    def __init__(self, policy: str | Policy = "auto", log: Callable[[str], None] | None = None,
                 log_every: int = 50, stream_ahead_bytes: int = 256 * 2**20):
        """stream_ahead_bytes: for weights stored in host RAM, how many compressed bytes may be
        on their way to (or waiting on) the GPU at once."""
        self.policy = parse_policy(policy)
        self.stream_ahead_bytes = stream_ahead_bytes
        self.log, self.log_every = log, log_every
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._held = 0  # bytes of the tensors in `entries`, kept current by _put/_drop
        self.order: list[int] = []  # access order seen in the first pass: what to prefetch next
        self._position: dict[int, int] = {}
        self._weights: dict[int, CompressedWeight] = {}
        self._prefetched: tuple[int, torch.Tensor, torch.cuda.Event] | None = None
        self._side_stream: torch.cuda.Stream | None = None
        self._host_streamer: HostStreamer | None = None  # host-RAM weights on their way to the GPU
        # Inside a captured pass, host-RAM weights are copied on a stream of their own, a few
        # ahead of their decode: (device copy, copy done) by weight.
        self._copy_stream: torch.cuda.Stream | None = None
        self._captured_copies: dict[int, tuple[EncodedTensor, torch.cuda.Event]] = {}
        self._gpu_timings: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.reset_stats()

    # ---- statistics -------------------------------------------------------------------------

    def reset_stats(self) -> None:
        self.forward_passes = self.decompressions = self.hits = self.misses = self.prefetch_hits = 0
        self.fused_calls = 0
        self.bytes_decoded = 0
        self.bytes_transferred = 0
        self._cpu_decode_seconds = 0.0
        self._gpu_timings.clear()
        self._ops = 0
        self._op_seconds = 0.0
        self.peak_bytes = 0  # most bytes of decompressed weights held at once, the one in use included

    @property
    def decode_seconds(self) -> float:
        gpu = 0.0
        if self._gpu_timings:
            torch.cuda.synchronize()
            gpu = sum(s.elapsed_time(e) for s, e in self._gpu_timings) / 1e3
        return self._cpu_decode_seconds + gpu

    @property
    def cache_bytes(self) -> int:
        held = self._held
        if self._prefetched is not None:
            held += self._prefetched[1].numel() * self._prefetched[1].element_size()
        return held

    @property
    def capacity(self) -> str:
        kind = self.policy.kind
        if kind in ("lru", "pin"):
            return str(self.policy.count)
        if kind == "all":
            return str(len(self._weights) or "all")
        if kind == "auto":
            return f"{self.policy.budget / 1e6:.0f}MB"
        return "0" if kind in ("none", "fused") else "pass"

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def add_counters(self, delta: dict[str, int], times: int = 1) -> None:
        """Account for `times` replays of a captured pass whose counters moved by `delta`."""
        for name, value in delta.items():
            setattr(self, name, getattr(self, name) + value * times)

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph of one pass replays what this cache would do (trivially so when
        the model has no compressed weights). Weights kept in host RAM qualify when each lies in
        one pinned block: the captured pass copies it over (a copy node in the graph) at each use."""
        if any(w.encoded.device.type == "cpu" and not capturable_copy(w.encoded) for w in self._weights.values()):
            return False
        return not self._weights or self.policy.kind in GRAPH_SAFE

    def count_fused(self) -> None:
        self.fused_calls += 1

    def stats(self) -> dict:
        accesses = self.hits + self.misses + self.prefetch_hits
        return {
            "policy": str(self.policy),
            "forward_passes": self.forward_passes,
            "accesses": accesses,
            "decompressions": self.decompressions,
            "hits": self.hits,
            "misses": self.misses,
            "prefetch_hits": self.prefetch_hits,
            "fused_calls": self.fused_calls,
            "hit_rate": self.hits / accesses if accesses else 0.0,
            "bytes_decoded": self.bytes_decoded,
            "bytes_transferred": self.bytes_transferred,
            "decode_seconds": self.decode_seconds,
            "cache_entries": len(self.entries),
            "cache_bytes": self.cache_bytes,
            "compressed_layers": len(self._weights),
        }

    # ---- the protocol ---------------------------------------------------------------------------

    def register(self, weight: CompressedWeight) -> int:
        key = id(weight)
        self._weights[key] = weight
        return key

    def begin_pass(self) -> None:
        self.forward_passes += 1
        if self.policy.kind == "per-pass":
            self._drop_all()

    def clear(self) -> None:
        self._drop_all()
        self._prefetched = None

    def close(self) -> None:
        """Let go of everything this cache holds for its weights: decompressed copies, a pending
        prefetch, host-RAM copies on their way (a model that moves to another cache)."""
        self.before_capture()
        self.clear()

    def before_capture(self) -> None:
        """Settle a prefetch issued by an eager pass: a captured pass may not wait on it."""
        if self._prefetched is not None:
            torch.cuda.current_stream(self._prefetched[1].device).wait_event(self._prefetched[2])
            self._prefetched = None
        if self._host_streamer is not None:  # copies issued ahead for eager passes: not for this one
            self._host_streamer.clear()
        self._captured_copies.clear()  # left by a capture that failed before end_capture

    def invalidate(self, weight: CompressedWeight) -> None:
        """Forget the decompressed copy of `weight` (its encoding changed)."""
        self._drop(id(weight))
        if self._prefetched is not None and self._prefetched[0] == id(weight):
            self._prefetched = None
        if self._host_streamer is not None:
            self._host_streamer.forget(id(weight))

    def get(self, weight: CompressedWeight, device: torch.device) -> torch.Tensor:
        """The decompressed weight, from the cache or decoded now."""
        key = id(weight)
        if key not in self._weights:
            self.register(weight)
        if self.forward_passes <= 1 and key not in self._position:
            self._position[key] = len(self.order)
            self.order.append(key)
        start = time.perf_counter()
        if key in self.entries:
            self.hits += 1
            if self.policy.kind == "lru":
                self.entries.move_to_end(key)
            tensor, status = self.entries[key], "HIT"
        elif self._prefetched is not None and self._prefetched[0] == key:
            _, tensor, ready = self._prefetched
            self._prefetched = None
            # No record_stream: the side stream reuses this block only after its next fork from
            # this stream, which comes after the caller's use of the tensor is enqueued (the next
            # get()). record_stream would also keep a capture from reusing any prefetched block.
            torch.cuda.current_stream(device).wait_event(ready)
            self.prefetch_hits += 1
            self._store(key, tensor)
            status = "PREFETCHED"
        else:
            self.misses += 1
            tensor = self._decode(weight, device)
            self._store(key, tensor)
            status = "MISS"
        transient = 0 if key in self.entries else tensor.numel() * tensor.element_size()
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes + transient)
        self._prefetch_after(key, device)
        self._stream_ahead(key, device)
        self._log_op(status, time.perf_counter() - start)
        return tensor

    # ---- internals ------------------------------------------------------------------------------

    def _decode(self, weight: CompressedWeight, device: torch.device) -> torch.Tensor:
        self.decompressions += 1
        self.bytes_decoded += weight.nbytes
        encoded = weight.encoded
        if encoded.device == device:
            return self._timed_decode(encoded, device)
        self.bytes_transferred += weight.compressed_nbytes
        if device.type != "cuda":
            return self._timed_decode(encoded.to(device), device)
        if torch.cuda.is_current_stream_capturing():  # pinned (graph_safe): copies in the graph
            tensor = self._timed_decode(self._captured_copy(id(weight), encoded, device), device)
            self._copy_ahead_captured(id(weight), device)
            return tensor
        # Host-RAM storage on CUDA: the copy was (or is now) issued on the streamer's stream.
        with self._streamer(device).use(id(weight), encoded) as on_device:
            return self._timed_decode(on_device, device)

    def _timed_decode(self, encoded: EncodedTensor, device: torch.device) -> torch.Tensor:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return decode(encoded, device, verify=False)  # inside a CUDA graph capture: no timing events
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            tensor = decode(encoded, device, verify=False)
            end.record()
            self._gpu_timings.append((start, end))
            return tensor
        start_s = time.perf_counter()
        tensor = decode(encoded, device, verify=False)
        self._cpu_decode_seconds += time.perf_counter() - start_s
        return tensor

    def _captured_copy(self, key: int, encoded: EncodedTensor, device: torch.device) -> EncodedTensor:
        """In a capture: the device copy issued ahead for this weight (waited for on the current
        stream), or one made now on the current stream."""
        pending = self._captured_copies.pop(key, None)
        if pending is None:
            return copy_to_device(encoded, device)[0]
        on_device, ready = pending
        torch.cuda.current_stream(device).wait_event(ready)
        return on_device

    def _copy_ahead_captured(self, key: int, device: torch.device) -> None:
        """In a capture: start copying the next host-RAM weights of this pass (not kept ones) on
        the copy stream, so the copy engine works while this weight decodes and computes. The
        copy stream first waits for the decodes enqueued so far: a device block freed by one of
        them may be reused by these copies, but only after that decode has read it."""
        position = self._position.get(key)
        if position is None:
            return
        current = torch.cuda.current_stream(device)
        joined = False
        for candidate in self.order[position + 1 : position + 1 + CAPTURED_COPIES_AHEAD]:
            encoded = self._weights[candidate].encoded
            if candidate in self.entries or candidate in self._captured_copies or encoded.device.type != "cpu":
                continue
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device)
            if not joined:
                self._copy_stream.wait_stream(current)
                joined = True
            with torch.cuda.stream(self._copy_stream):
                on_device = copy_to_device(encoded, device)[0]
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
            self._captured_copies[candidate] = (on_device, ready)

    def end_capture(self) -> None:
        """Inside a capture, after its pass: join copies issued ahead that the pass did not take
        (a capture must end with every stream it forked joined back)."""
        for on_device, ready in self._captured_copies.values():
            torch.cuda.current_stream(on_device.device).wait_event(ready)
        self._captured_copies.clear()

    def _streamer(self, device: torch.device) -> HostStreamer:
        if self._host_streamer is None or self._host_streamer.device != device:
            self._host_streamer = HostStreamer(device, self.stream_ahead_bytes)
        return self._host_streamer

    def _stream_ahead(self, key: int, device: torch.device) -> None:
        """From the second pass on, copy the host-stored weights that come next (in the first
        pass's order, skipping those held decompressed) while the GPU works on this one."""
        streamer = self._host_streamer
        position = self._position.get(key)
        if streamer is None or streamer.device != device or self.forward_passes < 2 or position is None:
            return
        if torch.cuda.is_current_stream_capturing():  # a captured pass copies each weight itself
            return
        prefetched = self._prefetched[0] if self._prefetched is not None else None
        for step in range(1, len(self.order)):
            candidate = self.order[(position + step) % len(self.order)]
            if candidate in self.entries or candidate == prefetched or streamer.is_issued(candidate):
                continue
            encoded = self._weights[candidate].encoded
            if encoded.device == device:
                continue
            if not streamer.has_room(streamer.size_of(encoded)):
                return
            streamer.issue(candidate, encoded)

    def _put(self, key: int, tensor: torch.Tensor) -> None:
        self._drop(key)
        self.entries[key] = tensor
        self._held += tensor.numel() * tensor.element_size()

    def _drop(self, key: int) -> None:
        tensor = self.entries.pop(key, None)
        if tensor is not None:
            self._held -= tensor.numel() * tensor.element_size()

    def _drop_all(self) -> None:
        self.entries.clear()
        self._held = 0

    def _store(self, key: int, tensor: torch.Tensor) -> None:
        kind = self.policy.kind
        if kind in ("per-pass", "all"):
            self._put(key, tensor)
        elif kind == "lru":
            if self.policy.count > 0:
                self._put(key, tensor)
                while len(self.entries) > self.policy.count:
                    self._drop(next(iter(self.entries)))
        elif kind == "pin":
            if len(self.entries) < self.policy.count:
                self._put(key, tensor)
        elif kind == "auto":
            if self._held + tensor.numel() * tensor.element_size() <= self.policy.budget:
                self._put(key, tensor)

    def _prefetch_after(self, key: int, device: torch.device) -> None:
        """auto on CUDA, from the second pass on: decode the next weight not held, one ahead."""
        if self.policy.kind != "auto" or device.type != "cuda" or self.forward_passes < 2 or not self.order:
            return
        if self._prefetched is not None:
            return
        position = self._position.get(key)
        if position is None:
            return
        # a captured pass prefetches within itself: a graph replay cannot hand a tensor to the next
        steps = len(self.order) - position if torch.cuda.is_current_stream_capturing() else len(self.order)
        for step in range(1, steps):
            candidate = self.order[(position + step) % len(self.order)]
            if candidate not in self.entries:
                break
        else:
            return
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        with torch.cuda.stream(self._side_stream):
            self._side_stream.wait_stream(main)
            tensor = self._decode(self._weights[candidate], device)
            ready = torch.cuda.Event()
            ready.record(self._side_stream)
        self._prefetched = (candidate, tensor, ready)

    def _log_op(self, status: str, seconds: float) -> None:
        self._ops += 1
        self._op_seconds += seconds
        if self.log is not None and self.log_every and self._ops % self.log_every == 0:
            self.log(
                f"  [Op {self._ops:5d}] {status:<4s} time={seconds * 1e3:7.2f}ms "
                f"avg={self._op_seconds / self._ops * 1e3:7.2f}ms cache={len(self.entries)}/{self.capacity}"
            )
