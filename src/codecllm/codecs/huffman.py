"""`huffman`: the exponent field Huffman-coded, sign and mantissa kept raw (DFloat11's idea).

Layout, chosen so both a vectorised CPU decoder and a GPU kernel decode many streams at once:

* The tensor's elements are dealt round-robin to `lanes = ceil(numel / S)` independent bit
  streams ("lanes", the tiles), S = `symbols_per_lane`: element e goes to lane e % lanes as its
  (e // lanes)-th symbol. At every step a block of consecutive lanes decodes one symbol each
  and writes consecutive outputs, so GPU stores coalesce.
* Each lane is a little-endian (LSB-first) bit stream of codewords; fp16's 3 sign/mantissa
  bits that do not fill a byte follow each codeword. The lanes are concatenated, and
  `lane_offsets` holds each one's starting bit.
* Code lengths are bounded by `code_bits` (12), so a 4096-entry table decodes a codeword
  from one 32-bit peek.
* The whole bytes of sign+mantissa are byte planes `rest` [rest_bytes, numel] in element order.

Every lane must end exactly where the next begins: the decoders check this, so a corrupted
stream or offset table raises instead of returning wrong weights.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from codecllm.codecs.base import LAYOUTS, Codec, EncodedTensor, expect_size
from codecllm.codecs.chunks import CHUNK, chunks, index_dtype
from codecllm.errors import CodecError

CODE_BITS = 12
SYMBOLS_PER_LANE = 256
# A lane's symbols decode one after another (~115 ns a step on an H100), so a small matrix is
# bound by that latency, not by bandwidth: up to SMALL_TENSOR elements, lanes are half as long
# (twice as many lanes, twice the lane offsets: +0.78% of bf16 size on those tensors only).
SMALL_TENSOR = 1 << 22
SMALL_TENSOR_SYMBOLS_PER_LANE = 128
# lanes the CPU decoder steps at once: enough to amortise NumPy's per-op cost, few enough that
# the stream windows they gather stay in cache (2^13 beat 2^10..2^15 on 0.2-33 M-weight matrices)
DECODE_LANES = 1 << 13


def huffman_lengths(histogram: list[int], max_bits: int = CODE_BITS) -> list[int]:
    """Code length per symbol (0 = absent), no longer than `max_bits`.

    Plain Huffman on the counts; while a code is too long, flatten the counts (halve, keep
    them non-zero) and rebuild. The alphabet is at most 256 symbols, so this loop is cheap.
    """
    counts = list(histogram)
    present = [s for s, c in enumerate(counts) if c]
    if len(present) <= 1:
        return [1 if c else 0 for c in counts]
    while True:
        heap = [(c, s, (s,)) for s, c in enumerate(counts) if c]
        heapq.heapify(heap)
        lengths = [0] * len(counts)
        while len(heap) > 1:
            c1, t1, s1 = heapq.heappop(heap)
            c2, t2, s2 = heapq.heappop(heap)
            for s in s1 + s2:
                lengths[s] += 1
            heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
        if max(lengths) <= max_bits:
            return lengths
        counts = [(c >> 1) | 1 if c else 0 for c in counts]


def canonical_codes(lengths: list[int]) -> list[int]:
    """Canonical codewords, bit-reversed so the first code bit is the stream's lowest bit."""
    codes = [0] * len(lengths)
    code, previous = 0, 0
    for length, symbol in sorted((n, s) for s, n in enumerate(lengths) if n):
        code <<= length - previous
        previous = length
        codes[symbol] = int(format(code, f"0{length}b")[::-1], 2)
        code += 1
    return codes


QUICK_BITS = 8  # the GPU decoder's first lookup peeks this many bits


def decode_table(lengths: torch.Tensor, code_bits: int) -> torch.Tensor:
    """int32 [2**code_bits + 2**QUICK_BITS]: entry = symbol | (length << 8); length 0 marks an
    invalid peek. The first 2**code_bits entries decode any codeword from a code_bits-bit peek;
    the last 2**QUICK_BITS decode the codewords of at most QUICK_BITS bits from a shorter peek
    (0 for longer ones), a table small enough that a warp's lookups touch few cache lines."""
    lengths_list = [int(n) for n in lengths.tolist()]
    if any(n > code_bits for n in lengths_list):
        raise CodecError(f"huffman code lengths exceed {code_bits} bits: corrupted")
    if sum(2.0**-n for n in lengths_list if n) > 1.0:
        raise CodecError("huffman code lengths violate the Kraft inequality: corrupted")
    table = torch.zeros(1 << code_bits, dtype=torch.int32)
    for symbol, (length, code) in enumerate(zip(lengths_list, canonical_codes(lengths_list))):
        if length:
            table[code :: 1 << length] = symbol | (length << 8)
    quick = table[torch.arange(1 << QUICK_BITS) & ((1 << code_bits) - 1)]
    quick = torch.where((quick >> 8) <= QUICK_BITS, quick, 0)
    return torch.cat([table, quick])


class HuffmanCodec(Codec):
    name = "huffman"
    has_gpu_decoder = True

    def __init__(self, symbols_per_lane: int | None = None, code_bits: int = CODE_BITS):
        """symbols_per_lane: None picks by size (SMALL_TENSOR_SYMBOLS_PER_LANE up to SMALL_TENSOR
        elements, else SYMBOLS_PER_LANE); the encoding records the value it used."""
        if symbols_per_lane is not None and (symbols_per_lane < 2 or symbols_per_lane % 2):
            raise ValueError(f"symbols_per_lane must be even and >= 2, got {symbols_per_lane}")
        self.symbols_per_lane = symbols_per_lane
        self.code_bits = code_bits

    def encode(self, flat):
        layout = LAYOUTS[flat.dtype]
        numel = flat.numel()
        histogram = torch.zeros(1 << layout.exponent_bits, dtype=torch.int64)
        rest_planes = torch.empty(layout.rest_bytes, numel, dtype=torch.uint8)
        for start, end in chunks(numel):  # one pass: exponent histogram and sign+mantissa bytes
            exponent, rest = layout.split(flat[start:end])
            histogram += torch.bincount(exponent, minlength=histogram.numel())
            for plane in range(layout.rest_bytes):
                rest_planes[plane, start:end] = (rest >> (8 * plane)).to(torch.uint8)
        lengths = huffman_lengths(histogram.tolist(), self.code_bits)
        # One lookup gives both: codeword in the low 16 bits, length (extra bits included) above.
        table = torch.tensor(
            [c | ((n + layout.extra_bits) << 16) for c, n in zip(canonical_codes(lengths), lengths)],
            dtype=torch.int32,
        )

        steps = self.symbols_per_lane or (
            SMALL_TENSOR_SYMBOLS_PER_LANE if numel <= SMALL_TENSOR else SYMBOLS_PER_LANE)
        lanes = -(-numel // steps)

        # Element e is symbol e // lanes of lane e % lanes: viewed as a [steps, lanes] matrix,
        # a lane is a column. Positions past numel are padding and get zero-length codes.
        values = flat.view(layout.int_dtype)
        if steps * lanes != numel:
            values = torch.cat([values, values.new_zeros(steps * lanes - numel)])
        matrix = values.view(steps, lanes)
        full_rows = numel // lanes if lanes else 0
        lane_offsets = torch.zeros(lanes, dtype=torch.int64)
        parts: list[tuple[int, torch.Tensor]] = []  # (first word index, int64 words)
        total_bits = 0
        for first, last in chunks(lanes, max(1, CHUNK // steps)):
            exponent, rest = layout.split(matrix[:, first:last].view(layout.dtype))
            entry = table[exponent]
            length = entry >> 16
            code = (entry & 0xFFFF).to(torch.int64)
            if layout.extra_bits:
                code |= (rest >> (8 * layout.rest_bytes)).to(torch.int64) << (length - layout.extra_bits)
            if full_rows < steps:  # padding sits in the rows from `full_rows` on: no bits
                tail = torch.arange(full_rows, steps).view(-1, 1) * lanes + torch.arange(first, last)
                length[full_rows:].masked_fill_(tail >= numel, 0)
                code[full_rows:].masked_fill_(tail >= numel, 0)
            # Lane-major, with neighbouring symbols fused in pairs (<= 30 bits each, so a pair
            # shifted by up to 31 still fits in int64): half the elements to scatter.
            length, code = length.t(), code.t()
            pair_length = (length[:, 0::2] + length[:, 1::2]).reshape(-1).to(torch.int64)
            pair_code = (code[:, 0::2] | (code[:, 1::2] << length[:, 0::2])).reshape(-1)
            ends = pair_length.cumsum(0)
            position = total_bits + ends - pair_length
            lane_offsets[first:last] = position.view(last - first, steps // 2)[:, 0]
            # Zero-length padding codes add nothing, so they need no filtering.
            word0 = total_bits >> 5
            chunk_bits = int(ends[-1])
            words = torch.zeros(((total_bits + chunk_bits) >> 5) - word0 + 2, dtype=torch.int64)
            shifted = pair_code << (position & 31)
            local = (position >> 5) - word0
            words.index_add_(0, local, shifted & 0xFFFFFFFF)
            words.index_add_(0, local + 1, shifted >> 32)
            parts.append((word0, words))
            total_bits += chunk_bits

        stream = torch.zeros((total_bits + 31) // 32 + 1, dtype=torch.int64)
        for word0, words in parts:  # neighbouring chunks share a boundary word: add, not set
            n = min(words.numel(), stream.numel() - word0)
            stream[word0 : word0 + n] += words[:n]
        stream32 = torch.from_numpy(stream.numpy().astype(np.uint32).view(np.int32))
        buffers = {
            "rest": rest_planes,
            "stream": stream32,
            "lane_offsets": lane_offsets.to(index_dtype(total_bits)),
            "code_lengths": torch.tensor(lengths, dtype=torch.uint8),
        }
        meta = {"symbols_per_lane": steps, "code_bits": self.code_bits, "total_bits": total_bits}
        return buffers, meta, max(1, lanes)

    # ---- decoding -------------------------------------------------------------------------

    @staticmethod
    def parts(encoded: EncodedTensor):
        """Validated pieces shared by both decoders, derived once per EncodedTensor."""
        if "huffman" not in encoded.derived:
            encoded.derived["huffman"] = HuffmanCodec._derive(encoded)
        return encoded.derived["huffman"]

    @staticmethod
    def _derive(encoded: EncodedTensor):
        layout = LAYOUTS[encoded.dtype]
        numel = encoded.numel
        meta = encoded.meta
        steps, code_bits, total_bits = (meta.get(k) for k in ("symbols_per_lane", "code_bits", "total_bits"))
        if not all(isinstance(v, int) and v >= 0 for v in (steps, code_bits, total_bits)) or not (
            steps >= 1 and 1 <= code_bits <= 16
        ):
            raise CodecError(f"huffman metadata is invalid: {meta}")
        lanes = -(-numel // steps)
        rest = expect_size(encoded, "rest", layout.rest_bytes * numel).view(layout.rest_bytes, numel)
        stream = expect_size(encoded, "stream", (total_bits + 31) // 32 + 1)
        offsets = expect_size(encoded, "lane_offsets", lanes)
        lengths = expect_size(encoded, "code_lengths", 1 << layout.exponent_bits)
        key = ("huffman_table", str(stream.device))  # per device, built once per encoding
        if key not in encoded.shared:
            encoded.shared[key] = decode_table(lengths.cpu(), code_bits).to(stream.device)
        table = encoded.shared[key]
        return layout, rest, stream, offsets, table, steps, code_bits, total_bits, lanes

    @staticmethod
    def check_ends(ends: torch.Tensor, offsets: torch.Tensor, total_bits: int) -> None:
        """Each lane must stop exactly where the next one starts (the last at total_bits)."""
        expected = torch.cat([offsets[1:].to(torch.int64), offsets.new_tensor([total_bits], dtype=torch.int64)])
        bad = (ends != expected).nonzero()
        if bad.numel():
            lane = int(bad[0])
            raise CodecError(
                f"huffman lane {lane} ended at bit {int(ends[lane])}, expected "
                f"{int(expected[lane])}: the stream or its offsets are corrupted"
            )

    def decode_cpu(self, encoded: EncodedTensor, verify: bool = True) -> torch.Tensor:
        # Lanes decode one symbol a step, all lanes of a chunk at once. Per step: one gather of
        # a 64-bit window (precomputed for every word of the stream), one peek, and gathers of
        # the symbol and of how far to move, from tables derived from the decode table. In NumPy:
        # a step is a few small array ops, and NumPy's per-op cost is a fraction of torch's
        # (1.6x faster than torch on a 0.2 M-weight matrix, as fast or faster on large ones).
        layout, rest, stream, offsets, table, steps, code_bits, total_bits, lanes = self.parts(encoded)
        numel = encoded.numel
        words = stream.numpy().view(np.uint32).astype(np.uint64)
        windows = words[:-1] | (words[1:] << np.uint64(32))  # windows[w]: stream bits 32w .. 32w + 63
        last_window = max(windows.size - 1, 0)
        entries = table[: 1 << code_bits].numpy().astype(np.int64)
        symbol_of, lengths = (entries & 0xFF).astype(np.uint8), entries >> 8
        length_of = lengths.astype(np.uint64)
        # An invalid peek (length 0) moves its lane far past the end, so the end check raises.
        advance_of = lengths + layout.extra_bits + (lengths == 0) * (1 << 40)
        peek_mask = np.uint64((1 << code_bits) - 1)
        extra_mask = np.uint64((1 << layout.extra_bits) - 1)
        exponent = np.empty(numel, dtype=np.uint8)
        extra = np.zeros(numel if extra_mask else 0, dtype=np.int32)
        ends = np.empty(lanes, dtype=np.int64)
        for first, last in chunks(lanes, DECODE_LANES):
            position = offsets[first:last].numpy().astype(np.int64)
            if verify and lanes and (bool((position < 0).any()) or bool((position > total_bits).any())):
                raise CodecError("huffman lane offsets point outside the stream: corrupted")
            np.maximum(position, 0, out=position)  # (unverified data) positions only grow from here
            for step in range(steps):
                count = min(last, numel - step * lanes) - first  # valid lanes form a prefix
                if count <= 0:
                    break
                p = position[:count]
                # uint64 throughout: NumPy would take uint64 with int64 to float64
                window = windows[np.minimum(p >> 5, last_window)] >> (p & 31).astype(np.uint64)
                peek = (window & peek_mask).astype(np.intp)
                out = step * lanes + first
                np.take(symbol_of, peek, out=exponent[out : out + count])
                if extra_mask:
                    extra[out : out + count] = (window >> length_of[peek]) & extra_mask
                p += advance_of[peek]
            ends[first:last] = position
        if verify and lanes:
            self.check_ends(torch.from_numpy(ends), offsets, total_bits)
        rest_value = rest[0]
        if layout.rest_bytes > 1 or extra_mask:  # fp16, fp32: the planes, then the extra bits above
            rest_value = rest_value.to(torch.int32)
            for plane in range(1, layout.rest_bytes):
                rest_value |= rest[plane].to(torch.int32) << (8 * plane)
            if extra_mask:
                rest_value |= torch.from_numpy(extra) << (8 * layout.rest_bytes)
        return layout.join(torch.from_numpy(exponent), rest_value)

    def decode_gpu(self, encoded: EncodedTensor, verify: bool = True) -> torch.Tensor:
        from codecllm.codecs.kernels.huffman_decode import huffman_decode

        layout, rest, stream, offsets, table, steps, code_bits, total_bits, lanes = self.parts(encoded)
        out, ends = huffman_decode(layout, rest, stream, offsets, table, steps, code_bits, encoded.numel)
        if verify and lanes:
            self.check_ends(ends, offsets, total_bits)
        return out
