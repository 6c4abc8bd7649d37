"""KV caches for attention and state caches for SSM layers."""

from codecllm.kv.cache import KVCache, cache_bytes
from codecllm.kv.enable import AttachedKVCache, disable_kv_cache, enable_kv_cache

__all__ = ["AttachedKVCache", "KVCache", "cache_bytes", "disable_kv_cache", "enable_kv_cache"]
