"""`codecllm.load(...)` -> Model: a model, its tokenizer, its weight cache, and `generate`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from codecllm.checkpoint import is_checkpoint, read_manifest
from codecllm.devices import device_of
from codecllm.errors import ConfigError
from codecllm.generate import Sampling, generate_tokens
from codecllm.kv.cache import cache_bytes
from codecllm.kv.variants import check_kv_for, parse_kv
from codecllm.models.config import ModelConfig
from codecllm.models.layers import rope_inverse_frequencies
from codecllm.models.loader import build_model, load_weights, resolve
from codecllm.models.tokenizer import load_tokenizer
from codecllm.weights.cache import WeightCache
from codecllm.weights.compress_model import attach_weight_cache, compress_model
from codecllm.weights.fast_linear import use_triton_gemv
from codecllm.weights.modules import CompressedEmbedding, CompressedLinear, serve_from

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


class Model:
    """A loaded model. `generate` takes token ids; `encode`/`decode` map text to ids and back."""

    def __init__(self, module: nn.Module, config: ModelConfig, tokenizer, weight_cache: WeightCache,
                 device: torch.device, kv: bool = True, source: str = "", cuda_graphs: bool | None = None):
        self.module, self.config, self.tokenizer = module, config, tokenizer
        self.weight_cache, self.device, self.kv, self.source = weight_cache, device, kv, source
        self.log: Callable[[str], None] | None = None
        self.cuda_graphs = cuda_graphs  # None: on where it is faithful (CUDA, KV cache, graph-safe policy)
        self._graphs: dict = {}  # captured decode graphs by (batch, cache length, greedy)

    @property
    def uses_cuda_graphs(self) -> bool:
        possible = self.device.type == "cuda" and self.kv == "on" and self.weight_cache.graph_safe
        if self.cuda_graphs and not possible:
            raise ConfigError(
                f"CUDA graphs need a CUDA device, kv='on' (not quantized) and a graph-safe cache policy "
                f"(none, per-pass, pin:K, all, fused); have device={self.device.type}, kv={self.kv}, "
                f"cache={self.weight_cache.policy}"
            )
        return possible if self.cuda_graphs is None else bool(self.cuda_graphs)

    @property
    def decode_graphs(self) -> list:
        """The decode steps captured so far (`generate.DecodeGraph`, one per batch size, cache
        length and sampling mode)."""
        return list(self._graphs.values())

    # ---- text ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    @property
    def stop_ids(self) -> list[int]:
        eos = self.config.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: int | Sequence[int] | None = None,
                 stream: bool = False):
        """New token ids after the prompt, in the prompt's form: a list of ids, a list of lists
        (batched, left-padded inside), a 1-D tensor or a (batch, length) tensor. Greedy when
        temperature is 0. `stop`: token id(s) that end a sequence (kept in the output). With
        stream=True, an iterator of ids (of lists of ids for a batch) instead."""
        ids, padding, form = self._batch(input_ids)
        stop_set = set([stop] if isinstance(stop, int) else (stop or []))
        steps = generate_tokens(
            self.module, ids, padding, max_new_tokens, max_len=self.config.max_position_embeddings,
            sampling=Sampling(temperature, top_k, top_p, seed), kv=self.kv, on_step=self._on_step,
            cuda_graph=self.uses_cuda_graphs, graphs=self._graphs,
        )
        self._token_clock = [time.perf_counter(), time.perf_counter()]
        if stream:
            iterator = self._until_stop(steps, ids.shape[0], stop_set)
            return (row[0] if form in ("list", "1d") else row for row in iterator)
        if stop_set:
            rows = list(self._until_stop(steps, ids.shape[0], stop_set))
        else:  # no per-token host sync: read every token once at the end
            collected = list(steps)
            rows = torch.stack(collected).tolist() if collected else []
        per_sequence = [[r[b] for r in rows] for b in range(ids.shape[0])]
        per_sequence = [_cut(seq, stop_set) for seq in per_sequence]
        if form == "list":
            return per_sequence[0]
        if form == "lists":
            return per_sequence
        width = max((len(s) for s in per_sequence), default=0)
        padded = [s + [s[-1] if s else 0] * (width - len(s)) for s in per_sequence]
        out = torch.tensor(padded, dtype=torch.long)
        return out[0] if form == "1d" else out

    def _until_stop(self, steps: Iterator[torch.Tensor], batch: int, stop: set[int]) -> Iterator[list[int]]:
        done = [False] * batch
        for token in steps:
            row = token.tolist()
            yield row
            for b, t in enumerate(row):
                done[b] = done[b] or t in stop
            if all(done):
                return

    def _batch(self, input_ids):
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 1:
                rows, form = [input_ids.tolist()], "1d"
            elif input_ids.dim() == 2:
                rows, form = input_ids.tolist(), "2d"
            else:
                raise ConfigError(f"input_ids must be 1-D or (batch, length), got shape {tuple(input_ids.shape)}")
        elif isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple)):
            rows, form = [list(r) for r in input_ids], "lists"
        elif isinstance(input_ids, (list, tuple)):
            rows, form = [list(input_ids)], "list"
        else:
            raise ConfigError(f"input_ids must be a list of ids, a list of lists or a tensor, not {type(input_ids)}")
        if not rows or any(len(r) == 0 for r in rows):
            raise ConfigError("every prompt needs at least one token")
        vocab = self.config.vocab_size
        bad = [t for r in rows for t in r if not 0 <= int(t) < vocab]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long, device=self.device)
        padding = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=self.device)
        return ids, padding, form

    def _on_step(self, step: int) -> None:
        if self.log is None:
            return
        now = time.perf_counter()
        took, total = now - self._token_clock[1], now - self._token_clock[0]
        self._token_clock[1] = now
        cache = self.weight_cache
        self.log(f"Token {step}: took {took:.3f}s, total {total:.3f}s, cache={len(cache.entries)}/{cache.capacity}")

    # ---- weight cache ---------------------------------------------------------------------------

    def set_cache(self, policy: str) -> None:
        """Serve the compressed layers through a new weight cache with `policy` ('none', 'auto:2GB',
        'fused', ...; as `load`'s cache argument), without reloading or re-encoding anything. The
        old cache's decompressed copies are freed, statistics start from zero, and captured decode
        graphs are dropped (they replay the old cache's decisions). Raises CacheError for a
        policy that does not parse, leaving the model as it was."""
        old = self.weight_cache
        new = WeightCache(policy, log=old.log, log_every=old.log_every, stream_ahead_bytes=old.stream_ahead_bytes)
        old.close()
        serve_from(self.module, new)
        attach_weight_cache(self.module, new)
        self.weight_cache = new
        self._graphs.clear()

    # ---- expert vectors --------------------------------------------------------------------------

    def set_expert_vectors(self, vectors: dict[str, torch.Tensor] | None) -> None:
        """Adapt linear layers: W = U diag(s) Vᵀ -> U diag(s·z) Vᵀ, z of length min(in, out) per
        named layer; None restores the base model exactly. Compressed base weights stay compressed;
        decompressed cache entries of those layers and every KV/state cache built before are
        invalidated (a stale cache raises CacheError instead of being read)."""
        from codecllm.weights.experts import apply_expert_vectors

        apply_expert_vectors(self.module, vectors)
        self._graphs.clear()  # captured graphs read the old weights

    # ---- introspection -------------------------------------------------------------------------

    def stats(self) -> dict:
        """Weight-cache statistics, plus the KV cache of the last generation: its variant, bytes
        allocated, tokens seen and stored, and tokens evicted (h2o)."""
        stats = self.weight_cache.stats()
        cache = getattr(self.module, "_codecllm_last_kv", None)
        stats["kv"] = self.kv
        stats["kv_cache_bytes"] = getattr(cache, "nbytes", 0) if cache is not None else 0
        stats["kv_tokens"] = cache.length if cache is not None else 0
        stats["kv_tokens_stored"] = cache.stored if cache is not None else 0
        stats["kv_evicted"] = getattr(cache, "evicted", 0) if cache is not None else 0
        return stats

    def reset_stats(self) -> None:
        self.weight_cache.reset_stats()

    def named_modules(self):
        return self.module.named_modules()

    def compressed_modules(self) -> list[tuple[str, nn.Module]]:
        kinds = (CompressedLinear, CompressedEmbedding)
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, kinds)]

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights held: plain parameters, compressed bytes, and their decompressed size."""
        stores = {id(m.weight_store): m.weight_store for _, m in self.compressed_modules()}
        seen, plain = set(), 0
        for p in self.module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                plain += p.numel() * p.element_size()
        compressed = sum(s.compressed_nbytes for s in stores.values())
        decompressed = sum(s.nbytes for s in stores.values())
        # the fused GEMV's escape tables, built beside the codec's buffers (the `fused` policy)
        gemv = sum(s.gemv.extra_nbytes for s in stores.values() if getattr(s, "gemv", None) is not None)
        return {"plain": plain, "compressed": compressed, "compressed_original": decompressed, "gemv_extra": gemv,
                "weights_held": plain + compressed + gemv, "weights_original": plain + decompressed}

    def kv_cache_bytes(self, batch: int, seq_len: int) -> int:
        dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)
        return cache_bytes(self.config, batch, seq_len, dtype)


def load(path_or_config: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         weights: str | None = None, cache: str = "auto", kv: bool | str = True, storage: str = "gpu",
         layers: str | None = None, seed: int = 0, log: Callable[[str], None] | None = None,
         cuda_graphs: bool | None = None, gemv: str = "auto") -> Model:
    """Load a model from a HF-layout directory, a codecllm checkpoint, or a named config (seeded
    random weights).

    weights: a codec name to compress on load ('huffman', 'nibble', ...), or None for as stored.
    cache: the weight-cache policy ('none', 'per-pass', 'lru:K', 'pin:K', 'auto[:BYTES]', 'all').
    kv: True/'on' a KV cache in the model's dtype, 'int8' / 'int4' a quantized one, False/'off'
    none (every step recomputes the whole sequence).
    cuda_graphs: replay each decode step as a CUDA graph; None = wherever that is faithful
    (CUDA, kv=True, a cache policy that does the same work every pass).
    storage: where compressed bytes live, 'gpu' (the compute device) or 'cpu' (host RAM; for a
    CUDA device pinned, one block a weight, copied over ahead of use, inside the decode graph too).
    gemv: 'auto' runs uncompressed linears of CUDA-graph decode steps (1-8 rows) through our Triton
    GEMV, faster than cuBLAS there; 'cublas' keeps cuBLAS everywhere.
    Raises ConfigError / CheckpointError / CacheError with a one-line reason.
    """
    if gemv not in ("auto", "cublas"):
        raise ConfigError(f"gemv must be 'auto' or 'cublas', got {gemv!r}")
    config, directory = resolve(path_or_config)
    torch_dtype = _dtype(dtype)
    if directory is None and torch_dtype is not None:
        config = config.replace(dtype=str(torch_dtype).removeprefix("torch."))
    device = device_of(device)
    kv_variant = check_kv_for(config, parse_kv(kv))  # before any weight is read
    if weights is not None and directory is not None and is_checkpoint(directory):
        stored = sorted({e.get("codec") for e in read_manifest(directory)["tensors"].values()} - {None, weights})
        if stored:  # compress_model leaves compressed layers alone: they would stay as stored
            raise ConfigError(f"{path_or_config} is stored compressed with {', '.join(stored)}; weights={weights!r} "
                              f"would not change that: load it as stored (no weights=), or compress the "
                              f"original model with {weights}")
    weight_cache = WeightCache(cache, log=log)
    with torch.device("meta"):
        module = build_model(config)
    load_weights(module, config, directory, device, torch_dtype, weight_cache, seed)
    if hasattr(module, "inv_freq"):  # built on the meta device with the rest: compute it for real
        module.inv_freq = rope_inverse_frequencies(config).to(device)
    module.eval()
    attach_weight_cache(module, weight_cache)
    if weights is not None:
        compress_model(module, weights, layers=layers, storage=storage, cache=weight_cache)
    if gemv == "auto" and device.type == "cuda":
        use_triton_gemv(module)
    tokenizer = load_tokenizer(directory, config.vocab_size, config.bos_token_id, config.eos_token_id)
    model = Model(module, config, tokenizer, weight_cache, device, kv_variant, str(path_or_config), cuda_graphs)
    model.log = log
    return model


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose one of: {', '.join(DTYPES)}") from None


def _cut(sequence: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(sequence):
        if t in stop:
            return sequence[: i + 1]
    return sequence
