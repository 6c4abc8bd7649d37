"""codecllm: run large language models in less GPU memory without changing a weight bit."""

from codecllm.checkpoint import compress_checkpoint, load_state_dict
from codecllm.codecs import EncodedTensor, decode, encode
from codecllm.engine import Model, load
from codecllm.errors import CacheError, CheckpointError, CodecError, CodecllmError, ConfigError
from codecllm.generate import generate
from codecllm.kv import disable_kv_cache, enable_kv_cache
from codecllm.weights import compress_model

__version__ = "0.1.0"

__all__ = [
    "CacheError",
    "CheckpointError",
    "CodecError",
    "CodecllmError",
    "ConfigError",
    "EncodedTensor",
    "Model",
    "compress_model",
    "disable_kv_cache",
    "enable_kv_cache",
    "generate",
    "load",
    "compress_checkpoint",
    "load_state_dict",
    "decode",
    "encode",
]
