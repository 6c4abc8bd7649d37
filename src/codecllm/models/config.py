"""Model configuration: one dataclass, a table of named shapes, and the Hugging Face mapping."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from codecllm.errors import ConfigError

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "mambaformer")

# Hugging Face `model_type` -> our architecture family.
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}


@dataclass
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (Llama family or GPT-2).

    Derived fields (`head_dim`, `num_key_value_heads`) are filled in `__post_init__`.
    """

    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5632
    num_hidden_layers: int = 22
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections have biases
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's queries and keys
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    dtype: str = "bfloat16"
    # MambaFormer (hybrid) only: selective-SSM state size, causal conv width, inner expansion.
    ssm_state_size: int = 16
    ssm_conv_kernel: int = 4
    ssm_expand: int = 2
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch {self.arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use bfloat16, float16 or float32")

    @property
    def num_linear_layers(self) -> int:
        """Linear layers a forward pass runs, lm_head included (the weight-cache unit)."""
        per_block = 4 if self.arch == "gpt2" else 7
        return self.num_hidden_layers * per_block + 1

    def parameter_count(self) -> int:
        if self.arch == "mambaformer":
            import torch

            from codecllm.models.loader import build_model

            with torch.device("meta"):
                return sum(p.numel() for p in build_model(self).parameters())
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        if self.arch == "gpt2":
            block = 4 * h * h + 4 * h + 2 * h * self.intermediate_size + self.intermediate_size + h + 4 * h
            return self.vocab_size * h + self.max_position_embeddings * h + self.num_hidden_layers * block + 2 * h
        block = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h
        if self.attention_bias:
            block += q + 2 * kv
        if self.qk_norm:
            block += 2 * self.head_dim
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_hidden_layers * block + h

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        try:
            values = NAMED_CONFIGS[name]
        except KeyError:
            raise ConfigError(
                f"unknown model config {name!r}; named configs: {', '.join(NAMED_CONFIGS)}"
            ) from None
        return cls(**values, name=name)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom") -> ModelConfig:
        """From a Hugging Face config.json dict; raises ConfigError for other architectures."""
        model_type = hf.get("model_type")
        arch = HF_MODEL_TYPES.get(model_type)
        if arch is None:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(HF_MODEL_TYPES)}"
            )
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        if arch == "gpt2":
            n_embd = hf["n_embd"]
            return cls(
                arch="gpt2", vocab_size=hf["vocab_size"], hidden_size=n_embd,
                intermediate_size=hf.get("n_inner") or 4 * n_embd, num_hidden_layers=hf["n_layer"],
                num_attention_heads=hf["n_head"], max_position_embeddings=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                dtype=dtype, name=name,
            )
        return cls(
            arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta_of(hf),
            rope_scaling=rope_scaling_of(hf), tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", arch == "qwen2"), qk_norm=arch == "qwen3",
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), dtype=dtype,
            name=name,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        try:
            hf = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{config_file} not found: a model directory needs a config.json") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_file} is not valid JSON: {exc}") from None
        try:
            return cls.from_hf(hf, name=Path(path).name)
        except KeyError as exc:
            raise ConfigError(f"{config_file} lacks the field {exc.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config.json dict that `transformers` loads as the same model."""
        common = {"vocab_size": self.vocab_size, "bos_token_id": self.bos_token_id,
                  "eos_token_id": self.eos_token_id, "torch_dtype": self.dtype,
                  "tie_word_embeddings": self.tie_word_embeddings}
        if self.arch == "gpt2":
            return {**common, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                    "n_embd": self.hidden_size, "n_layer": self.num_hidden_layers,
                    "n_head": self.num_attention_heads, "n_positions": self.max_position_embeddings,
                    "n_inner": self.intermediate_size, "layer_norm_epsilon": self.norm_eps,
                    "activation_function": "gelu_new", "tie_word_embeddings": True}
        class_names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        hf = {**common, "model_type": self.arch, "architectures": [class_names[self.arch]],
              "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
              "num_hidden_layers": self.num_hidden_layers,
              "num_attention_heads": self.num_attention_heads,
              "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
              "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.norm_eps,
              "rope_theta": self.rope_theta, "hidden_act": "silu"}
        if self.rope_scaling:
            hf["rope_scaling"] = {**self.rope_scaling, "rope_theta": self.rope_theta}
        if self.arch in ("llama", "qwen2", "qwen3"):
            hf["attention_bias"] = self.attention_bias
        if self.arch == "llama":
            hf["mlp_bias"] = False
        return hf

    def replace(self, **changes: Any) -> ModelConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelConfig(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_theta_of(hf: dict[str, Any]) -> float:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or scaling.get("rope_theta") or 10000.0)


def rope_scaling_of(hf: dict[str, Any]) -> dict[str, Any] | None:
    """The RoPE scaling dict, None for plain RoPE; only 'llama3' scaling is supported."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"rope scaling {kind!r} is not supported; supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return {"rope_type": "llama3", **{k: scaling[k] for k in keys}}


LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

NAMED_CONFIGS: dict[str, dict[str, Any]] = {
    # A few million parameters: CPU demos and tests. Byte-level vocabulary (256 bytes + specials).
    "tiny": dict(arch="llama", vocab_size=320, hidden_size=256, intermediate_size=688,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                 max_position_embeddings=2048, bos_token_id=256, eos_token_id=257),
    # The seeds' model: 22 blocks x 7 linears + lm_head = 155 linear layers.
    "tinyllama-1.1b": dict(arch="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048),
    "llama-3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_SCALING, "factor": 32.0}, tie_word_embeddings=True,
                         bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={**LLAMA3_SCALING, "factor": 8.0},
                         bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, attention_bias=True,
                         bos_token_id=151643, eos_token_id=151643),
    # Seed 003's hybrid: an initial Mamba block, then (attention, Mamba) pairs.
    "mambaformer-tiny": dict(arch="mambaformer", vocab_size=320, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
                             bos_token_id=256, eos_token_id=257, dtype="float32"),
    "mambaformer-small": dict(arch="mambaformer", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                              num_hidden_layers=8, num_attention_heads=12, max_position_embeddings=2048),
    "gpt2": dict(arch="gpt2", vocab_size=50257, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=1024,
                 tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256, dtype="float32"),
}
