"""Every benchmark script renders its report from its stored JSON alone (the `.txt` beside each
result is that report, written in the same run), so the stored results and the scripts' report
functions must keep agreeing: each row of every stored result appears in its rendered report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = BENCHMARKS / "results"
# script: glob of its stored results
SCRIPTS = {
    "codecs": "codecs-*.json",
    "decode": "decode-*.json",
    "gemv": "gemv-*.json",
    "offload": "offload-*.json",
    "dfloat11_model": "dfloat11_model-*.json",
    "decode_profile": "decode_profile-*.json",
    "step_profile": "step_profile-*.json",
}


def script(name: str):
    """benchmarks/NAME.py as a module (by path: `codecs` would be the standard library's)."""
    if name == "gemv":
        pytest.importorskip("triton")
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their `common`
    try:
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def row_labels(name: str, payload: dict) -> list[str]:
    rows = payload["rows"]
    if isinstance(rows, dict):
        return list(rows)
    if name == "codecs":
        return [r["codec"] for r in rows]
    if name == "step_profile":
        return [r[0][:80] for r in rows[:25]]
    if name == "decode_profile":
        return ["x".join(map(str, r["shape"])) for r in rows]
    if name == "gemv":
        return [f"{r['n']}x{r['k']}" for r in rows] + [r["group"] for r in payload["grouped"]]
    raise AssertionError(f"no row labels known for {name}'s results")


CASES = [(name, path) for name, pattern in SCRIPTS.items() for path in sorted(RESULTS.glob(pattern))]


def test_there_are_stored_results_for_every_script():
    assert {name for name, _ in CASES} == set(SCRIPTS)


@pytest.mark.parametrize(("name", "path"), CASES, ids=[path.stem for _, path in CASES])
def test_each_stored_result_renders_with_its_rows(name, path):
    payload = json.loads(path.read_text())
    text = script(name).report(payload)
    labels = row_labels(name, payload)
    assert labels and text.startswith("|"), text[:200]
    missing = [label for label in labels if label not in text]
    assert not missing, f"{path.name}: rows not in the report: {missing}"
    date = payload.get("environment", {}).get("date")
    assert date is None or date in text
    replayed = payload.get("nibble_vs_bf16_step_replay")  # decode.py's step graphs replayed alone
    assert not replayed or f"nibble / bf16 median {replayed['median']:.3f}x" in text


def test_a_bare_prompt_is_refused_where_a_list_of_prompts_is_expected():
    # decode.ours() once took offload.py's single prompt for a batch of 128 one-token prompts and
    # multiplied its tok/s by 128
    decode = script("decode")
    with pytest.raises(TypeError, match="list of prompts"):
        decode.ours("tiny", [1, 2, 3], 8)
    with pytest.raises(TypeError, match="list of prompts"):
        decode.hf_generator(None, [1, 2, 3])


def test_decode_roofline_counts_the_bytes_a_step_reads():
    """A decode step reads every weight but the embedding table, of which it reads a row a
    sequence (all of it where lm_head shares the table), plus the KV cache: a roofline over all
    parameter bytes put the 8B's bf16 graph at 1.02 of the copy bandwidth."""
    import dataclasses

    import torch

    from codecllm.kv import cache_bytes
    from codecllm.models import ModelConfig

    decode = script("decode")
    config = ModelConfig.from_name("tinyllama-1.1b")
    full = config.parameter_count() * 2
    kv = cache_bytes(config, 2, 128 + 128, torch.bfloat16)
    table = config.vocab_size * config.hidden_size * 2
    assert decode.step_bytes(config, 2, full, 128, 256) == full - table + 2 * config.hidden_size * 2 + kv
    tied = dataclasses.replace(config, tie_word_embeddings=True)
    assert decode.step_bytes(tied, 2, tied.parameter_count() * 2, 128, 256) == tied.parameter_count() * 2 + kv
    # a compressed model's table is taken at its bytes' average rate
    assert decode.step_bytes(config, 2, full * 0.75, 128, 256) == pytest.approx((full - table + 4 * 2048) * 0.75 + kv)


def test_summary_headline_figures_come_from_the_prompt_128_runs():
    """summary.json's per-model figures are the goals' (prompt 128, batch 1): a run with a longer
    prompt (decode-MODEL-pP) goes under long_prompt and must not replace them."""
    summary = json.loads((RESULTS / "summary.json").read_text())
    tag = summary["gpu"].replace(" ", "-")
    for model, tok_s in summary["codecllm_bf16_tok_s"].items():
        data = json.loads((RESULTS / f"decode-{model}-{tag}.json").read_text())
        assert data["prompt"] == 128 and data.get("batch", 1) == 1
        bf16 = [r["tok_s"] for label, r in data["rows"].items() if label.startswith("codecllm bf16") and "tok_s" in r]
        assert tok_s == max(bf16)
    for model, runs in summary.get("long_prompt", {}).items():
        for prompt, figures in runs.items():
            data = json.loads((RESULTS / f"decode-{model}-p{prompt}-{tag}.json").read_text())
            assert data["prompt"] == int(prompt) != 128
            assert figures["codecllm_bf16_tok_s"] in [r.get("tok_s") for r in data["rows"].values()]
