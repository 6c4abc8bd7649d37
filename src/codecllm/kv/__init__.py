"""KV caches for attention and state caches for SSM layers."""

from codecllm.kv.cache import KVCache, cache_bytes

__all__ = ["KVCache", "cache_bytes"]
