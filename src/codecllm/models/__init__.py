"""Compact model definitions, named configs and loaders."""

from codecllm.models.config import NAMED_CONFIGS, ModelConfig
from codecllm.models.synthetic import random_state_dict, save_hf_directory, write_random_model

__all__ = ["NAMED_CONFIGS", "ModelConfig", "random_state_dict", "save_hf_directory", "write_random_model"]
