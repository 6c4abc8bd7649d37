"""Tokenizers: `tokenizers` for a directory's tokenizer.json, a byte-level one for random models."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes are token ids 0..255; other ids (random models emit them) print as <id>."""

    def __init__(self, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None):
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        if any(i >= self.vocab_size for i in ids):
            ids = [i % self.vocab_size for i in ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                pending.append(i)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            out.append(f"<{i}>")
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.inner = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=False)


def load_tokenizer(directory: Path | None, vocab_size: int, bos=None, eos=None):
    if directory is not None and (Path(directory) / "tokenizer.json").exists():
        return HFTokenizer(Path(directory) / "tokenizer.json")
    return ByteTokenizer(vocab_size, bos, eos if isinstance(eos, int) else None)
