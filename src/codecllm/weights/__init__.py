"""Compressed layers, the weight cache and its policies."""

from codecllm.weights.cache import POLICIES, CompressedWeight, WeightCache, parse_policy
from codecllm.weights.compress_model import compress_model
from codecllm.weights.fast_linear import GemvLinear, use_triton_gemv
from codecllm.weights.modules import CompressedEmbedding, CompressedLinear

__all__ = ["POLICIES", "CompressedEmbedding", "CompressedLinear", "CompressedWeight", "GemvLinear", "WeightCache",
           "compress_model", "parse_policy", "use_triton_gemv"]
