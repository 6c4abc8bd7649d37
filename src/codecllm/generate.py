"""The generation loop: prefill, decode, sampling, streaming.

With a KV cache, prefill runs the whole prompt once and each decode step runs one token; without
one, every step recomputes the whole sequence (O(n²), the baseline seed 004 measures).
Batches are left-padded: `padding` marks real tokens, positions count only those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from codecllm.codecs import triton_available
from codecllm.errors import ConfigError
from codecllm.kv.cache import KVCache
from codecllm.kv.variants import make_kv_cache, parse_kv
from codecllm.models import fused
from codecllm.models.layers import causal_mask
from codecllm.weights.experts import stamp
from codecllm.weights.fast_linear import graph_step


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). Greedy when temperature is 0."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > sampling.top_p  # keep the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def positions_of(padding: torch.Tensor) -> torch.Tensor:
    """Left padding: each real token's position counts the real tokens before it."""
    return (padding.long().cumsum(-1) - 1).clamp(min=0)


def generate_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    padding: torch.Tensor,
    max_new_tokens: int,
    *,
    max_len: int,
    sampling: Sampling | None = None,
    kv: bool | str = True,
    kv_dtype: torch.dtype | None = None,
    on_step: Callable[[int], None] | None = None,
    cuda_graph: bool = False,
    graphs: dict | None = None,
) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids (on the model's device), one step at a time.

    input_ids, padding: (B, T), left-padded; max_len: the model's position limit.
    cuda_graph: capture one decode step as a CUDA graph and replay it (needs kv; the first
    token comes from an eager prefill). `graphs` keeps captured graphs for reuse across calls.
    The arguments are checked here, before the first step: a mistake raises at the call, not at
    the first token a caller asks for (after it has printed the prompt, say).
    """
    batch, prompt_len = input_ids.shape
    if prompt_len == 0:
        raise ConfigError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    variant = parse_kv(kv)
    unbounded = variant.startswith(("sliding:", "h2o:"))
    if unbounded and (not bool(padding.all()) or model.config.arch == "gpt2"):
        raise ConfigError("sliding-window and h2o KV caches take unpadded prompts of RoPE models (not gpt2)")
    if model.config.arch == "mambaformer" and not bool(padding.all()):
        raise ConfigError("the hybrid Mamba/attention model takes unpadded prompts (its state would absorb padding)")
    if prompt_len + max_new_tokens > max_len and not unbounded:
        raise ConfigError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"maximum length {max_len}"
        )
    return _steps(model, input_ids, padding, max_new_tokens, max_len, sampling or Sampling(), variant, kv_dtype,
                  on_step, cuda_graph, graphs)


@torch.inference_mode()
def _steps(model, input_ids, padding, max_new_tokens, max_len, sampling, variant, kv_dtype, on_step, cuda_graph,
           graphs) -> Iterator[torch.Tensor]:
    """generate_tokens' steps, its arguments checked."""
    batch, prompt_len = input_ids.shape
    unbounded = variant.startswith(("sliding:", "h2o:"))
    device = input_ids.device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    cache = graph = None
    if variant != "off":
        config = model.config
        dtype = kv_dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        length = min(prompt_len + max_new_tokens, max_len)
        if cuda_graph and max_new_tokens > 1 and variant == "on" and config.arch != "mambaformer":
            length = graph_cache_length(length, max_len)
            key = (batch, length, sampling.temperature == 0)
            graphs = {} if graphs is None else graphs
            if key not in graphs:
                graphs[key] = DecodeGraph(model, make_kv_cache(variant, config, batch, length, dtype, device),
                                          batch, sampling.temperature == 0)
            graph = graphs[key]
            cache = graph.cache
            cache.reset()
            stamp(cache, model)
        else:
            cache = stamp(make_kv_cache(variant, config, batch, length, dtype, device, prompt_len), model)

    model._codecllm_last_kv = cache  # for Model.stats(): what the last generation's cache held
    tokens, mask_padding = input_ids, padding
    positions = positions_of(padding)
    logits = model(tokens, positions, causal_mask(padding, prompt_len, prompt_len, device), cache)
    if cache is not None:
        cache.advance(prompt_len)
    if graph is not None:
        yield from _graphed_decode(graph, padding, positions, logits, max_new_tokens, sampling, generator, on_step)
        return
    for step in range(max_new_tokens):
        next_token = sample(logits[:, -1], sampling, generator)
        yield next_token
        if on_step is not None:
            on_step(step)
        if step == max_new_tokens - 1:
            break
        mask_padding = torch.cat([mask_padding, mask_padding.new_ones(batch, 1)], dim=1)
        total = mask_padding.shape[1]
        if cache is not None:
            position = positions[:, -1:] + 1
            positions = torch.cat([positions, position], dim=1)
            if unbounded:  # these caches keep only real past tokens: attend to all of them
                mask = None
            else:
                mask = causal_mask(mask_padding, 1, total, device)
            logits = model(next_token[:, None], position, mask, cache)
            cache.advance(1)
        else:
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            positions = positions_of(mask_padding)
            logits = model(tokens, positions, causal_mask(mask_padding, total, total, device), None)


class DecodeGraph:
    """One decode step captured as a CUDA graph, with its static KV cache, reused across calls
    of the same (batch, cache length). Token, positions and the cache slot live in device buffers
    and advance inside the graph, so greedy decoding needs no host synchronisation per token."""

    def __init__(self, model, cache: KVCache, batch: int, greedy: bool):
        device = cache.k.device
        self.model, self.cache, self.greedy = model, cache, greedy
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.padding = torch.ones(batch, cache.max_len, dtype=torch.bool, device=device)
        self.columns = torch.arange(cache.max_len, device=device)
        # Additive (0 / -inf) in the cache's dtype: a boolean mask would be converted by every
        # layer's attention call (three small kernels per layer).
        self.mask = torch.zeros(batch, 1, 1, cache.max_len, dtype=cache.k.dtype, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.per_pass: dict[str, int] = {}

    def _build_mask(self) -> None:
        """The mask of the positions the next step sees: those up to the slot it writes."""
        visible = (self.columns <= self.slot)[None, None, None, :] & self.padding[:, None, None, :]
        self.mask.zero_().masked_fill_(~visible, float("-inf"))

    def _step(self) -> None:
        with graph_step():
            self.logits = self.model(self.token, self.position, self.mask, self.cache)[:, -1]
        if fused.switched_on() and triton_available():
            # the argmax, the position and slot counts and the next step's mask column in one
            # kernel (eight small ones otherwise)
            from codecllm.models.fused_kernels import finish_step

            finish_step(self.logits, self.token, self.position, self.slot, self.mask, self.padding, self.greedy)
            return
        if self.greedy:
            self.token.copy_(self.logits.argmax(-1, keepdim=True))
        self.position.add_(1)
        self.slot.add_(1)
        self._build_mask()

    def start(self, token: torch.Tensor, position: torch.Tensor, padding: torch.Tensor) -> None:
        """Load the state after a prefill of padding.shape[1] tokens; capture on first use."""
        prompt_len = padding.shape[1]
        self.cache.slot = self.slot

        def load_state():
            self.token.copy_(token.view(-1, 1))
            self.position.copy_(position)
            self.slot.fill_(prompt_len)
            self.padding.fill_(True)
            self.padding[:, :prompt_len] = padding
            self._build_mask()

        load_state()
        if self.graph is not None:
            return
        weight_cache = getattr(self.model, "weight_cache", None)
        counters = weight_cache.counters() if weight_cache is not None else None
        device = self.token.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile kernels, fill weight caches, settle the allocator
                self._step()
                load_state()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        before = weight_cache.counters() if weight_cache is not None else None
        if weight_cache is not None:
            weight_cache.before_capture()
        with torch.cuda.graph(self.graph):
            self._step()
            if weight_cache is not None:
                weight_cache.end_capture()
        if weight_cache is not None:  # count replays only: one captured pass's work per replay
            self.per_pass = {k: v - before[k] for k, v in weight_cache.counters().items()}
            for name, value in counters.items():
                setattr(weight_cache, name, value)
        load_state()

    def replay(self) -> None:
        self.graph.replay()
        weight_cache = getattr(self.model, "weight_cache", None)
        if weight_cache is not None:
            weight_cache.add_counters(self.per_pass)

    def finish(self) -> None:
        self.cache.slot = None

    def time_steps(self, steps: int, first_slot: int) -> float:
        """Seconds that `steps` replays of the captured step take on the GPU, from cache slot
        `first_slot` on (as after a prompt of that length), timed by CUDA events with nothing
        between the replays: the device's time per token without the host's per-token work. The
        state moves back to that slot first; the rows it rewrites then hold the graph's own
        greedy continuation, not the last decode's. A timer for benchmarks, not a decode: the
        weight cache's counters are left alone."""
        if self.graph is None:
            raise RuntimeError("no step captured yet: decode once first")
        if first_slot < 0 or first_slot + steps > self.cache.max_len:
            raise ValueError(f"slots {first_slot}..{first_slot + steps - 1} do not fit this graph's cache of "
                             f"{self.cache.max_len}")
        with torch.inference_mode():  # the buffers are inference tensors (generate runs in that mode)
            back = int(self.slot.item()) - first_slot
            self.position.sub_(back)  # positions and the slot advance together, one a step
            self.slot.fill_(first_slot)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            self.graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000


def graph_cache_length(needed: int, max_len: int) -> int:
    """Static caches come in 256-token buckets, so one captured graph serves many prompt sizes."""
    return min(max_len, -(-needed // 256) * 256)


def _graphed_decode(graph: DecodeGraph, padding, positions, logits, max_new_tokens, sampling, generator, on_step):
    batch = padding.shape[0]
    graph.start(sample(logits[:, -1], sampling, generator), positions[:, -1:] + 1, padding)
    try:
        yield graph.token.view(-1).clone()
        if on_step is not None:
            on_step(0)
        for i in range(1, max_new_tokens):
            graph.replay()
            if not graph.greedy:
                graph.token.copy_(sample(graph.logits, sampling, generator).view(batch, 1))
            yield graph.token.view(-1).clone()
            if on_step is not None:
                on_step(i)
    finally:
        graph.finish()


def _logits_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None):
    """Generate with any supported model: a codecllm Model, one of our modules, or a model we did
    not write (`model(ids)` -> logits, a tuple starting with them, or an object with .logits).
    Cached when enable_kv_cache(model) was called (or our models' own cache), full recompute
    otherwise. input_ids: a list of ids, a 1-D or a (batch, length) tensor; returns the new ids
    in the same form."""
    from codecllm.engine import Model
    from codecllm.kv.enable import attached_cache
    from codecllm.models.gpt2 import GPT2LMHeadModel
    from codecllm.models.llama import LlamaForCausalLM

    OUR_MODELS = (LlamaForCausalLM, GPT2LMHeadModel)  # noqa: N806

    if isinstance(model, Model):
        return model.generate(input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    form = "list" if isinstance(input_ids, (list, tuple)) else ("1d" if input_ids.dim() == 1 else "2d")
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, device=device).view(1, -1) if form != "2d" else input_ids.to(device)
    sampling = Sampling(temperature, top_k, top_p, seed)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = attached_cache(model)
    new = []
    if isinstance(model, OUR_MODELS):  # they take positions, a mask and our KVCache directly
        padding = torch.ones_like(ids, dtype=torch.bool)
        steps = generate_tokens(model, ids, padding, max_new_tokens, max_len=model.config.max_position_embeddings,
                                sampling=sampling)
        new = list(steps)
    else:
        if cache is not None:
            cache.reset()
        logits = _logits_of(model(ids))
        sequence = ids
        for step in range(max_new_tokens):
            token = sample(logits[:, -1].float(), sampling, generator)
            new.append(token)
            if step == max_new_tokens - 1:
                break
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            logits = _logits_of(model(token[:, None] if cache is not None else sequence))
    out = torch.stack(new, dim=1) if new else ids.new_zeros(ids.shape[0], 0)
    if form == "list":
        return out[0].tolist()
    return out[0] if form == "1d" else out
