"""`zstd`: general-purpose CPU compression of the raw bytes, in independent frames.

The seeds' first prototype and a baseline: it takes every float dtype, runs on the CPU only,
and compresses bf16 weights far less than the exponent codecs do.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import zstandard

from codecllm.codecs.base import Codec, EncodedTensor, buffer
from codecllm.errors import CodecError

TILE_BYTES = 4 << 20  # one zstd frame per 4 MiB of input: independent, decoded in parallel
# Each frame carries its xxhash checksum, so a corrupted frame raises instead of decoding.
LEVEL = 3


def _threads() -> int:
    return max(1, torch.get_num_threads())


class ZstdCodec(Codec):
    name = "zstd"

    def encode(self, flat):
        raw = flat.view(torch.uint8).numpy()
        pieces = [raw[i : i + TILE_BYTES] for i in range(0, raw.size, TILE_BYTES)] or [raw]

        def compress(piece: np.ndarray) -> bytes:
            return zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(piece.tobytes())

        with ThreadPoolExecutor(_threads()) as pool:
            frames = list(pool.map(compress, pieces))
        offsets = np.zeros(len(frames) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(f) for f in frames])
        data = torch.frombuffer(bytearray(b"".join(frames)), dtype=torch.uint8)
        return {"data": data, "tile_offsets": torch.from_numpy(offsets)}, {}, len(frames)

    def decode_cpu(self, encoded: EncodedTensor, verify: bool = True) -> torch.Tensor:
        data = buffer(encoded, "data").cpu().numpy()
        offsets = buffer(encoded, "tile_offsets").cpu().tolist()
        if (
            len(offsets) != encoded.tiles + 1
            or offsets[0] != 0
            or offsets[-1] != data.size
            or any(b < a for a, b in zip(offsets, offsets[1:]))
        ):
            raise CodecError("zstd tile offsets are inconsistent with the data")
        expected = encoded.original_nbytes
        if expected == 0:
            return torch.empty(0, dtype=encoded.dtype)
        sizes = [min(TILE_BYTES, expected - i) for i in range(0, expected, TILE_BYTES)] or [0]

        def decompress(i: int) -> bytes:
            frame = data[offsets[i] : offsets[i + 1]].tobytes()
            try:
                out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=sizes[i])
            except zstandard.ZstdError as exc:
                raise CodecError(f"zstd tile {i} is corrupted: {exc}") from None
            if len(out) != sizes[i]:
                raise CodecError(f"zstd tile {i} decoded to {len(out)} bytes, expected {sizes[i]}")
            return out

        if len(sizes) != encoded.tiles:
            raise CodecError(f"zstd data has {encoded.tiles} tiles, expected {len(sizes)}")
        with ThreadPoolExecutor(_threads()) as pool:
            out = b"".join(pool.map(decompress, range(encoded.tiles)))
        return torch.frombuffer(bytearray(out), dtype=torch.uint8).view(encoded.dtype)
