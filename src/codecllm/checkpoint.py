"""The compressed checkpoint format: safetensors containers + a JSON manifest with checksums.

    OUT_DIR/
      codecllm.json            manifest: format version, per-tensor codec/dtype/shape/meta,
                               where each buffer lives, a sha256 per buffer and per original tensor
      weights-00001.safetensors  encoded buffers ("NAME::BUFFER") and tensors kept as they are
      config.json, tokenizer.json, ...   every other file of the source directory, copied

Reading checks every buffer's checksum; `verify_checkpoint` also decodes every tensor and checks
it against the checksum of the original. Writing goes to a temporary directory that is renamed
into place only when complete, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from codecllm.codecs import EncodedTensor, decode, encode, get_codec
from codecllm.codecs.base import dtype_from_name, dtype_name
from codecllm.devices import device_of
from codecllm.errors import CheckpointError, CodecError
from codecllm.progress import progress

log = logging.getLogger(__name__)

MANIFEST = "codecllm.json"
FORMAT = "codecllm"
FORMAT_VERSION = 1
SHARD_BYTES = 2 << 30
SEPARATOR = "::"


def sha256_of(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (C order)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.cpu().numpy().data).hexdigest()


# ---- reading a Hugging Face-layout directory ---------------------------------------------------


def safetensors_files(model_dir: Path) -> list[Path]:
    """The *.safetensors files of a HF-layout directory, in index order when there is an index."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory")
    if (model_dir / MANIFEST).exists():
        raise CheckpointError(f"{model_dir} is already a codecllm checkpoint")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        files = [model_dir / f for f in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f} is listed in the safetensors index but missing")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(name, file, tensor) for every tensor, one at a time."""
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f, handle.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file: {exc}") from None


def block_index(name: str) -> int | None:
    """The transformer block a tensor belongs to ('model.layers.3.mlp...' -> 3), if any."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def parse_layer_spec(spec: str | None) -> list[str | tuple[int, int]] | None:
    """'0-3,7,*lm_head*' -> [(0, 3), (7, 7), '*lm_head*']; None selects every weight."""
    if spec is None:
        return None
    items: list[str | tuple[int, int]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if re.fullmatch(r"\d+", item):
            items.append((int(item), int(item)))
        elif re.fullmatch(r"\d+-\d+", item):
            lo, hi = (int(x) for x in item.split("-"))
            if hi < lo:
                raise CheckpointError(f"--layers range {item!r} is empty: write LOW-HIGH")
            items.append((lo, hi))
        else:
            items.append(item)
    if not items:
        raise CheckpointError(f"--layers {spec!r} selects nothing: use block ranges like 0-3 or name globs")
    return items


def check_selects_some(spec: str | None, layers: list[str | tuple[int, int]] | None, names: list[str]) -> None:
    """Raise CheckpointError when a `--layers` spec matches none of the weight `names`: a typo
    would otherwise compress nothing and say so only in a count."""
    if layers is not None and names and not any(matches_layers(n, layers) for n in names):
        raise CheckpointError(
            f"layers {spec!r} selects none of the {len(names)} weights (such as {names[0]!r}): "
            "block ranges like 0-3 pick blocks, globs like '*mlp*' pick names"
        )


def matches_layers(name: str, layers: list[str | tuple[int, int]] | None) -> bool:
    """Whether `name` is selected: its block index is in a range, or a glob matches it."""
    if layers is None:
        return True
    block = block_index(name)
    for item in layers:
        if isinstance(item, tuple):
            if block is not None and item[0] <= block <= item[1]:
                return True
        elif fnmatch.fnmatchcase(name, item):
            return True
    return False


def wants_compression(name: str, t: torch.Tensor, layers: list[str | tuple[int, int]] | None) -> bool:
    """Default: every 2-D floating-point weight (linear and embedding layers)."""
    if t.ndim != 2 or not t.is_floating_point() or not name.endswith("weight"):
        return False
    return matches_layers(name, layers)


# ---- writing ---------------------------------------------------------------------------------


@dataclass
class CompressSummary:
    out_dir: Path
    tensors: int
    compressed: int
    original_bytes: int
    stored_bytes: int
    kept_uncompressed: dict[str, int]  # reason -> count

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.original_bytes if self.original_bytes else 1.0


class _ShardWriter:
    """Accumulates tensors and writes safetensors files of about SHARD_BYTES each."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.count = 0

    @property
    def current_file(self) -> str:
        return f"weights-{self.count + 1:05d}.safetensors"

    def add(self, key: str, t: torch.Tensor) -> str:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > SHARD_BYTES:
            self.flush()
        self.pending[key] = t.contiguous()
        self.pending_bytes += nbytes
        return self.current_file

    def flush(self) -> None:
        if self.pending:
            save_file(self.pending, self.directory / self.current_file, metadata={"format": FORMAT})
            self.count += 1
            self.pending, self.pending_bytes = {}, 0


def check_compress_options(out_dir: str | Path, codec: str, layers: str | None, overwrite: bool):
    """(the codec, the layer selection) for compress_checkpoint, or the error its options make,
    raised before any work (the CLI checks them before it builds a named model)."""
    impl = get_codec(codec)
    selection = parse_layer_spec(layers)
    if Path(out_dir).exists() and not overwrite:
        raise CheckpointError(f"{out_dir} already exists; pass --overwrite to replace it")
    return impl, selection


def compress_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    codec: str = "huffman",
    layers: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> CompressSummary:
    """Compress a Hugging Face-layout directory into a codecllm checkpoint at `out_dir`.

    Every tensor comes back exactly from `load_state_dict`. 2-D floating-point weights (all, or
    those `layers` selects: block ranges like '0-3' and name globs, comma-separated) are encoded
    with `codec`; the rest, and weights of a dtype the codec does not take, are kept as they are.
    Raises CheckpointError for unreadable input or an existing `out_dir` without `overwrite`.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    impl, selection = check_compress_options(out_dir, codec, layers, overwrite)
    files = safetensors_files(model_dir)
    check_selects_some(layers, selection, _matrix_names(files))
    if out_dir.resolve() == model_dir.resolve():
        raise CheckpointError("the output directory must differ from the model directory")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = _write(model_dir, files, tmp, impl.name, selection, show_progress)
        _copy_side_files(model_dir, files, tmp)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.out_dir = out_dir
    return summary


def _matrix_names(files: list[Path]) -> list[str]:
    """The names of the 2-D floating-point weights, from the files' headers (no tensor read)."""
    names = []
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    piece = handle.get_slice(name)
                    if (name.endswith("weight") and len(piece.get_shape()) == 2
                            and piece.get_dtype().startswith(("F", "BF"))):
                        names.append(name)
        except SafetensorError as exc:
            raise CheckpointError(f"{f} is not a readable safetensors file: {exc}") from None
    return names


def _write(model_dir, files, tmp, codec, selection, show_progress) -> CompressSummary:
    writer = _ShardWriter(tmp)
    entries: dict[str, Any] = {}
    kept: dict[str, int] = {}
    original_total = stored_total = compressed = 0
    total = sum(f.stat().st_size for f in files)
    with progress(total=total, unit="B", unit_scale=True, desc="compress", enabled=show_progress) as bar:
        for name, _, t in iter_safetensors(files):
            nbytes = t.numel() * t.element_size()
            entry: dict[str, Any] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                                     "sha256": sha256_of(t), "original_bytes": nbytes}
            use_codec = wants_compression(name, t, selection)
            if use_codec and t.dtype not in get_codec(codec).dtypes:
                reason = f"{dtype_name(t.dtype)} weights kept as they are ({codec} does not take them)"
                kept[reason] = kept.get(reason, 0) + 1
                use_codec = False
            if use_codec:
                encoded = encode(t, codec)
                entry.update(codec=codec, meta=encoded.meta, tiles=encoded.tiles, buffers={})
                for buf_name, buf in encoded.buffers.items():
                    key = f"{name}{SEPARATOR}{buf_name}"
                    entry["buffers"][buf_name] = {"file": writer.add(key, buf), "key": key,
                                                  "sha256": sha256_of(buf)}
                entry["stored_bytes"] = encoded.nbytes
                compressed += 1
            else:
                entry.update(codec=None, stored={"file": writer.add(name, t), "key": name})
                entry["stored_bytes"] = nbytes
            entries[name] = entry
            original_total += nbytes
            stored_total += entry["stored_bytes"]
            bar.update(nbytes)
    writer.flush()
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "codec": codec,
                "source": model_dir.name, "tensors": entries}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return CompressSummary(tmp, len(entries), compressed, original_total, stored_total, kept)


def _copy_side_files(model_dir: Path, files: list[Path], tmp: Path) -> None:
    """Config, tokenizer and any other plain files travel along unchanged."""
    skip = {f.name for f in files} | {"model.safetensors.index.json"}
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, tmp / f.name)


# ---- reading ---------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        raise CheckpointError(f"{path} is not a codecllm checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_file} is not valid JSON (truncated?): {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_file} is not a codecllm manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_file} has format version {manifest.get('version')!r}; "
            f"this codecllm reads version {FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"{manifest_file} lists no tensors")
    return manifest


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).exists()


class _Reader:
    """Opens each safetensors file once and reads keys from it, checking checksums."""

    def __init__(self, root: Path, stack: ExitStack, device: str = "cpu"):
        self.root, self.stack, self.device = root, stack, device
        self.handles: dict[str, Any] = {}

    def get(self, tensor: str, ref: dict[str, Any], checksum: str | None) -> torch.Tensor:
        file = ref.get("file")
        path = self.root / str(file)
        if file not in self.handles:
            if not path.exists():
                raise CheckpointError(f"{path} is missing (needed for tensor {tensor!r})")
            try:
                self.handles[file] = self.stack.enter_context(safe_open(path, framework="pt"))
            except SafetensorError as exc:
                raise CheckpointError(f"{path} is truncated or corrupted: {exc}") from None
        try:
            t = self.handles[file].get_tensor(ref["key"])
        except (SafetensorError, KeyError) as exc:
            raise CheckpointError(f"{path}: cannot read {ref.get('key')!r} of tensor {tensor!r}: {exc}") from None
        if checksum is not None and sha256_of(t) != checksum:
            raise CheckpointError(f"{path}: checksum mismatch in tensor {tensor!r} ({ref['key']})")
        return t


def _entry_to_encoded(name: str, entry: dict[str, Any], reader: _Reader) -> EncodedTensor | torch.Tensor:
    try:
        if entry.get("codec") is None:
            return reader.get(name, entry["stored"], entry["sha256"])
        buffers = {b: reader.get(name, ref, ref["sha256"]) for b, ref in entry["buffers"].items()}
        return EncodedTensor(entry["codec"], dtype_from_name(entry["dtype"]), tuple(entry["shape"]),
                             buffers, entry.get("meta", {}), entry.get("tiles", 1))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"manifest entry of tensor {name!r} is malformed: missing {exc}") from None
    except CodecError as exc:
        raise CheckpointError(f"tensor {name!r}: {exc}") from None


def iter_encoded(path: str | Path, names: list[str] | None = None
                 ) -> Iterator[tuple[str, dict[str, Any], EncodedTensor | torch.Tensor]]:
    """(name, manifest entry, EncodedTensor or plain tensor) per tensor, buffers checksummed."""
    path = Path(path)
    manifest = read_manifest(path)
    entries = manifest["tensors"]
    with ExitStack() as stack:
        reader = _Reader(path, stack)
        for name in names if names is not None else list(entries):
            if name not in entries:
                raise CheckpointError(f"{path} has no tensor {name!r}")
            yield name, entries[name], _entry_to_encoded(name, entries[name], reader)


def load_encoded(path: str | Path) -> dict[str, EncodedTensor | torch.Tensor]:
    """Every tensor of a checkpoint, still encoded (plain tensors for those kept as they are)."""
    return {name: value for name, _, value in iter_encoded(path)}


def load_state_dict(path: str | Path, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The exact original tensors of a codecllm checkpoint (or of a plain HF-layout directory)."""
    path, device = Path(path), device_of(device or "cpu")
    if not is_checkpoint(path):
        return {name: t.to(device or "cpu") for name, _, t in iter_safetensors(safetensors_files(path))}
    state = {}
    for name, _, value in iter_encoded(path):
        state[name] = _decode_entry(name, value, device)
    return state


def _decode_entry(name: str, value: EncodedTensor | torch.Tensor, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device or "cpu")
    try:
        return decode(value, device or "cpu")
    except CodecError as exc:
        raise CheckpointError(f"tensor {name!r} cannot be decoded: {exc}") from None


@dataclass
class VerifyResult:
    tensors: int
    bytes_checked: int
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


def verify_checkpoint(path: str | Path, device: str | None = None, show_progress: bool = True) -> VerifyResult:
    """Decode every tensor and compare with the checksum of the original; collect failures."""
    path, device = Path(path), device_of(device or "cpu")
    manifest = read_manifest(path)
    failures: list[str] = []
    checked = 0
    total = sum(e.get("original_bytes", 0) for e in manifest["tensors"].values())
    with progress(total=total, unit="B", unit_scale=True, desc="verify", enabled=show_progress) as bar:
        names = list(manifest["tensors"])
        with ExitStack() as stack:
            reader = _Reader(path, stack)
            for name in names:
                entry = manifest["tensors"][name]
                try:
                    t = _decode_entry(name, _entry_to_encoded(name, entry, reader), device)
                    if dtype_name(t.dtype) != entry.get("dtype") or list(t.shape) != entry.get("shape"):
                        failures.append(f"{name}: decoded {dtype_name(t.dtype)}{list(t.shape)}, manifest "
                                        f"says {entry.get('dtype')}{entry.get('shape')}")
                    elif sha256_of(t) != entry.get("sha256"):
                        failures.append(f"{name}: decoded tensor does not match the original checksum")
                except CheckpointError as exc:
                    failures.append(str(exc))
                checked += entry.get("original_bytes", 0)
                bar.update(entry.get("original_bytes", 0))
    return VerifyResult(len(names), checked, failures)


def inspect_rows(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-tensor rows (name, codec, dtype, shape, bytes, ratio) and the totals."""
    manifest = read_manifest(path)
    rows = []
    for name, e in manifest["tensors"].items():
        original, stored = e.get("original_bytes", 0), e.get("stored_bytes", 0)
        rows.append({"name": name, "codec": e.get("codec") or "-", "dtype": e.get("dtype"),
                     "shape": "x".join(map(str, e.get("shape", []))) or "scalar",
                     "original_bytes": original, "stored_bytes": stored,
                     "ratio": stored / original if original else 1.0})
    original = sum(r["original_bytes"] for r in rows)
    stored = sum(r["stored_bytes"] for r in rows)
    totals = {"tensors": len(rows), "compressed": sum(r["codec"] != "-" for r in rows),
              "original_bytes": original, "stored_bytes": stored,
              "ratio": stored / original if original else 1.0, "codec": manifest.get("codec")}
    return rows, totals


__all__ = [
    "CompressSummary",
    "VerifyResult",
    "compress_checkpoint",
    "inspect_rows",
    "is_checkpoint",
    "iter_encoded",
    "load_encoded",
    "load_state_dict",
    "read_manifest",
    "verify_checkpoint",
]
