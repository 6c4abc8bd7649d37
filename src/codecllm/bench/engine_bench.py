"""`codecllm bench`: baseline vs compressed generation, per weight-cache policy, with seed 001's
RESULTS SUMMARY, a hit-rate table (measured next to theory) and a memory-vs-compressed-layers table."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codecllm import checkpoint
from codecllm.engine import Model, load
from codecllm.models.config import NAMED_CONFIGS
from codecllm.models.loader import resolve
from codecllm.models.synthetic import save_hf_directory, write_random_model
from codecllm.report import format_table, human_bytes

DEFAULT_POLICIES = ("none", "per-pass", "lru:20", "pin:20", "auto:64MB", "all")


@dataclass
class RunResult:
    label: str
    seconds: float
    new_tokens: int
    memory: dict[str, int]
    output: str
    tokens: list[int]
    stats: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


@contextlib.contextmanager
def prepared_directories(model: str, codec: str, seed: int = 0) -> Iterator[tuple[Path, Path]]:
    """(plain HF directory, codecllm checkpoint): random weights written once, compressed once."""
    with tempfile.TemporaryDirectory(prefix="codecllm-bench-") as tmp:
        path = Path(model)
        if not path.is_dir():
            if model not in NAMED_CONFIGS:
                resolve(model)  # raises the one-line error listing what is valid
            path = write_random_model(model, Path(tmp) / "model", seed=seed)
        if checkpoint.is_checkpoint(path):  # the baseline is its decoded original (bit-exact), written plain
            plain = write_decoded(path, Path(tmp) / "model")
            yield plain, path
            return
        compressed = Path(tmp) / f"model.{codec}"
        checkpoint.compress_checkpoint(path, compressed, codec=codec, show_progress=False)
        yield path, compressed


def write_decoded(checkpoint_dir: Path, out: Path) -> Path:
    """A plain HF-layout copy of a codecllm checkpoint: its exact original tensors, its config,
    tokenizer and other side files."""
    config, _ = resolve(checkpoint_dir)
    save_hf_directory(config, checkpoint.load_state_dict(checkpoint_dir), out)
    for f in checkpoint_dir.iterdir():  # config.json too: the original's, not one rebuilt from ours
        if f.is_file() and f.name != checkpoint.MANIFEST and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    return out


def stored_codec(model: str) -> str | None:
    """The codec a codecllm checkpoint directory is stored with; None for anything else."""
    path = Path(model)
    return checkpoint.read_manifest(path).get("codec") if checkpoint.is_checkpoint(path) else None


def measure(model: Model, prompt: list[int], max_new_tokens: int, label: str) -> RunResult:
    device = model.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    weights = model.weight_bytes()
    held_before = weights["weights_held"] + model.weight_cache.cache_bytes
    model.reset_stats()
    model.weight_cache.peak_bytes = model.weight_cache.cache_bytes
    start = time.perf_counter()
    tokens = model.generate(prompt, max_new_tokens)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        memory = {"before": before, "after": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}
    else:  # on the CPU: the bytes held by weights and weight caches (activations not counted)
        memory = {"before": held_before, "after": weights["weights_held"] + model.weight_cache.cache_bytes,
                  "peak": weights["weights_held"] + model.weight_cache.peak_bytes}
    memory["delta"] = memory["after"] - memory["before"]
    return RunResult(label, seconds, len(tokens), memory, model.decode(tokens), tokens, model.stats(), weights)


def run_policies(plain: Path, compressed: Path, prompt_text: str, max_new_tokens: int, policies, device: str,
                 log: Callable[[str], None] | None = None, warmup: bool = True
                 ) -> tuple[RunResult, list[RunResult], list[int]]:
    baseline_model = load(plain, device=device)
    prompt = baseline_model.encode(prompt_text) or [0]
    if warmup:  # a full-length run first: kernel loading, allocator and GPU clocks settle
        baseline_model.generate(prompt, max_new_tokens)
    baseline = measure(baseline_model, prompt, max_new_tokens, "baseline")
    del baseline_model
    results = []
    for policy in policies:
        model = load(compressed, device=device, cache=policy, log=log)
        if warmup:
            model.generate(prompt, max_new_tokens)
            model.weight_cache.clear()
        results.append(measure(model, prompt, max_new_tokens, policy))
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return baseline, results, prompt


def results_summary(baseline: RunResult, results: list[RunResult], codec: str) -> str:
    """Seed 001's RESULTS SUMMARY, one block for the baseline and one per policy."""
    lines = ["=" * 80, "RESULTS SUMMARY", "=" * 80, "", "Baseline:",
             f"  Time: {baseline.seconds:.2f}s ({baseline.tokens_per_second:.1f} tok/s)",
             f"  Memory: {human_bytes(baseline.memory['peak'])} peak", f"  Output: {baseline.output!r}"]
    for r in results:
        s = r.stats
        ratio = r.weights["compressed"] / r.weights["compressed_original"] if r.weights["compressed_original"] else 1
        per_pass = s["decompressions"] / s["forward_passes"] if s["forward_passes"] else 0
        lines += [
            "", f"Compressed ({codec}, cache {r.label}):",
            f"  Time: {r.seconds:.2f}s ({r.tokens_per_second:.1f} tok/s, "
            f"{r.seconds / baseline.seconds:.1f}x the baseline's time)",
            f"  Memory: before {human_bytes(r.memory['before'])}, after {human_bytes(r.memory['after'])}, "
            f"peak {human_bytes(r.memory['peak'])}, delta {human_bytes(r.memory['delta'])} "
            f"({r.memory['peak'] / baseline.memory['peak']:.2f}x the baseline's peak)",
            f"  Compression: {1 / ratio:.2f}x ({ratio:.1%} of the original size)",
            f"  Compressed layers: {s['compressed_layers']}/{s['compressed_layers']}",
            f"  Forward passes: {s['forward_passes']}",
            f"  Decompressions: {s['decompressions']} ({per_pass:.1f} per forward pass)",
            f"  Hit rate: {s['hit_rate']:.1%} ({s['hits']} hits, {s['misses']} misses"
            + (f", {s['prefetch_hits']} served by prefetch" if s["prefetch_hits"] else "") + ")",
            f"  Output: {r.output!r}",
            "  " + ("✓ Output matches baseline (perfect reconstruction)" if r.tokens == baseline.tokens
                    else "✗ OUTPUT DIFFERS FROM THE BASELINE"),
        ]
    return "\n".join(lines)


def theoretical_hit_rate(policy: str, layers: int, passes: int) -> float:
    """Hit rate of a policy on `passes` cyclic scans over `layers` weights, each used once per pass."""
    kind, _, arg = policy.partition(":")
    accesses = layers * passes
    if kind == "lru":
        k = int(arg)
        return (layers * (passes - 1)) / accesses if k >= layers else 0.0  # LRU evicts just before reuse
    if kind == "pin":
        return min(int(arg), layers) * (passes - 1) / accesses
    if kind == "all":
        return (passes - 1) / passes
    return 0.0  # none, per-pass: each weight is used once per pass


def hit_rate_table(compressed: Path, prompt: list[int], max_new_tokens: int, device: str,
                   sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for kind in ("lru", "pin"):
        for k in sizes:
            model = load(compressed, device=device, cache=f"{kind}:{k}")
            model.generate(prompt, max_new_tokens)
            s = model.stats()
            layers, passes = s["compressed_layers"], s["forward_passes"]
            rows.append({"policy": f"{kind}:{k}", "layers": layers, "passes": passes, "measured": s["hit_rate"],
                         "theory": theoretical_hit_rate(f"{kind}:{k}", layers, passes),
                         "steady_state": min(k, layers) / layers if kind == "pin" else
                         (1.0 if k >= layers else 0.0)})
    return rows


def memory_table(plain: Path, codec: str, prompt: list[int], max_new_tokens: int, device: str,
                 fractions=(0.0, 0.25, 0.5, 0.75, 1.0)) -> list[dict[str, Any]]:
    """Weights held and peak memory when the first N blocks are compressed (seed 001's scaling)."""
    config, _ = resolve(plain)
    rows = []
    for fraction in fractions:
        blocks = round(config.num_hidden_layers * fraction)
        layers = f"0-{blocks - 1}" if blocks else None
        model = load(plain, device=device, weights=codec if blocks else None, layers=layers, cache="per-pass")
        r = measure(model, prompt, max_new_tokens, f"{blocks} blocks")
        rows.append({"blocks": blocks, "of": config.num_hidden_layers,
                     "compressed_layers": r.stats["compressed_layers"], "weights_held": r.weights["weights_held"],
                     "weights_original": r.weights["weights_original"], "peak": r.memory["peak"],
                     "tokens_per_second": r.tokens_per_second})
        del model
    return rows


def format_hit_rates(rows) -> str:
    return format_table(["policy", "layers", "passes", "hit rate (measured)", "hit rate (theory)",
                         "steady state per pass"],
                        [[r["policy"], r["layers"], r["passes"], f"{r['measured']:.1%}", f"{r['theory']:.1%}",
                          f"{r['steady_state']:.1%}"] for r in rows])


def format_memory(rows) -> str:
    return format_table(["compressed blocks", "compressed layers", "weights held", "vs all bf16", "peak", "tok/s"],
                        [[f"{r['blocks']}/{r['of']}", r["compressed_layers"], human_bytes(r["weights_held"]),
                          f"{r['weights_held'] / r['weights_original']:.1%}", human_bytes(r["peak"]),
                          f"{r['tokens_per_second']:.1f}"] for r in rows])


def policy_table(baseline: RunResult, results: list[RunResult]) -> str:
    rows = [["baseline", f"{baseline.tokens_per_second:.1f}", "1.00x", human_bytes(baseline.memory["peak"]),
             "-", "-", "-", "yes"]]
    for r in results:
        s = r.stats
        rows.append([r.label, f"{r.tokens_per_second:.1f}", f"{r.seconds / baseline.seconds:.2f}x",
                     human_bytes(r.memory["peak"]), s["decompressions"], f"{s['hit_rate']:.1%}",
                     human_bytes(s["cache_bytes"]), "yes" if r.tokens == baseline.tokens else "NO"])
    return format_table(["cache policy", "tok/s", "time vs baseline", "peak memory", "decompressions", "hit rate",
                         "cache held", "same output"], rows)
