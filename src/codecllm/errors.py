"""Exception types, one per failure family. The CLI catches `CodecllmError` once and
prints its message as a single line; anything else is a bug and keeps its traceback."""


class CodecllmError(Exception):
    """Base class for errors caused by user input or data, not by bugs."""


class CodecError(CodecllmError, ValueError):
    """A tensor cannot be encoded, or encoded data is inconsistent and cannot be decoded."""


class CheckpointError(CodecllmError):
    """A checkpoint directory is missing, truncated, corrupted or of an unknown version."""


class ConfigError(CodecllmError, ValueError):
    """An invalid configuration value: names the field, the value and what is allowed."""


class CacheError(CodecllmError, ValueError):
    """A weight-cache or KV-cache policy is invalid, or a cache is used out of bounds."""
