"""The engine's public API and command line: happy paths and clear errors."""

import json

import pytest
import torch

import codecllm
from codecllm.cli import main
from codecllm.errors import CacheError, ConfigError
from codecllm.models import write_random_model


def test_unknown_config_lists_supported():
    with pytest.raises(ConfigError, match="tinyllama-1.1b"):
        codecllm.load("llama-9000")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="bert.*supported"):
        codecllm.load(tmp_path)


def test_prompt_longer_than_max_length():
    model = codecllm.load("tiny")
    with pytest.raises(ConfigError, match="maximum length 2048"):
        model.generate([1] * 2040, 20)


def test_token_outside_vocabulary():
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        codecllm.load("tiny").generate([5, 100000], 2)


def test_policy_typo_on_load():
    with pytest.raises(CacheError, match="lru:K"):
        codecllm.load("tiny", cache="lru20")


def test_input_forms_round_trip():
    model = codecllm.load("tiny")
    ids = [10, 20, 30]
    as_list = model.generate(ids, 4)
    assert isinstance(as_list, list) and len(as_list) == 4
    assert model.generate(torch.tensor(ids), 4).tolist() == as_list
    assert model.generate(torch.tensor([ids, ids]), 4).tolist() == [as_list, as_list]
    assert list(model.generate(ids, 4, stream=True)) == as_list


def test_stop_token_ends_generation():
    model = codecllm.load("tiny")
    first = model.generate([10, 20, 30], 6)
    assert model.generate([10, 20, 30], 6, stop=first[1]) == first[:2]


def test_sampling_is_seeded():
    model = codecllm.load("tiny")
    a = model.generate([1, 2, 3], 8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = model.generate([1, 2, 3], 8, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert a == b


def test_named_modules_keep_linear_features():
    model = codecllm.load("tiny", weights="nibble")
    linears = {n: m for n, m in model.named_modules() if type(m).__name__ == "CompressedLinear"}
    q = linears["model.layers.0.self_attn.q_proj"]
    assert (q.in_features, q.out_features) == (256, 256)


def test_set_cache_switches_policy_without_reencoding():
    model = codecllm.load("tiny", weights="huffman", cache="lru:4")
    prompt = [5, 6, 7]
    expected = model.generate(prompt, 5)
    store = model.module.model.layers[0].self_attn.q_proj.weight_store
    encoded = store.encoded
    old = model.weight_cache
    assert old.stats()["cache_entries"] > 0
    model.set_cache("all")
    assert old.stats()["cache_entries"] == 0  # the old cache let its copies go
    assert model.generate(prompt, 5) == expected
    stats = model.stats()
    assert stats["policy"] == "all" and stats["compressed_layers"] == 30 and stats["cache_entries"] == 30
    assert stats["forward_passes"] == 5 and store.encoded is encoded  # fresh counters, same bytes
    model.set_cache("none")
    assert model.generate(prompt, 5) == expected and model.stats()["cache_entries"] == 0
    with pytest.raises(CacheError, match="unknown cache policy 'every'"):
        model.set_cache("every")
    assert model.stats()["policy"] == "none"  # a bad policy leaves the model as it was


def test_load_compressed_checkpoint_matches_plain(tmp_path):
    from codecllm.models import write_random_model

    plain = write_random_model("tiny", tmp_path / "m")
    codecllm.compress_checkpoint(plain, tmp_path / "c", codec="nibble", show_progress=False)
    a = codecllm.load(plain).generate([5, 6, 7], 5)
    model = codecllm.load(tmp_path / "c", cache="none")
    assert model.generate([5, 6, 7], 5) == a
    assert model.stats()["compressed_layers"] == 30


def test_cli_generate(capsys):
    assert main(["generate", "tiny", "-p", "Hello", "--max-new-tokens", "4", "--weights", "nibble",
                 "--cache", "pin:5", "--kv", "off"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello") and "decompressions" in captured.err


@pytest.mark.parametrize("value, message", [
    ("maybe", "--kv: unknown KV cache 'maybe'; choose one of: on, off, int8"),
    ("sliding:0", "--kv: KV cache 'sliding:0': write sliding:WINDOW or sliding:WINDOW:SINKS "
                  "(whole numbers, WINDOW >= 1)"),
    ("h2o:x", "--kv: KV cache 'h2o:x': write h2o:BUDGET or h2o:BUDGET:RECENT"),
])
def test_cli_generate_bad_kv(capsys, value, message):
    """The CLI passes on why a --kv spec is wrong (a window of 0, not just the list of forms)."""
    assert main(["generate", "tiny", "-p", "x", "--kv", value]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("option, value, message", [
    ("--max-new-tokens", "-1", "max_new_tokens must be >= 0, got -1"),
    ("--max-new-tokens", "5000", "exceeds the model's maximum length 2048"),
    ("--temperature", "-1", "temperature must be >= 0"),
    ("--top-p", "2", "top_p must be in (0, 1]"),
])
def test_cli_generate_checks_its_arguments_before_it_prints(capsys, option, value, message):
    assert main(["generate", "tiny", "-p", "Hello", option, value]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


@pytest.mark.parametrize("device, message", [("foo", "'foo' is not a device; use cpu, cuda"),
                                             ("mps", "'mps' is not supported"),
                                             ("cuda:99", "'cuda:99'")])
def test_a_device_this_machine_cannot_run_on_is_named(device, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        codecllm.load("tiny", device=device)
    with pytest.raises(ConfigError, match=message):
        codecllm.decode(codecllm.encode(torch.ones(4, dtype=torch.bfloat16), "nibble"), device)
    codecllm.compress_checkpoint(write_random_model("tiny", tmp_path / "m"), tmp_path / "c", show_progress=False)
    assert main(["verify", str(tmp_path / "c"), "--device", device]) == 1  # one line, no traceback
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_named():
    with pytest.raises(ConfigError, match="'cuda' was asked for but CUDA is not available here"):
        codecllm.load("tiny", device="cuda")


@pytest.mark.parametrize("model, kv, message", [("mambaformer-tiny", "int8", "takes kv on or off, not 'int8'"),
                                               ("gpt2", "sliding:8", "needs a RoPE model")])
def test_a_kv_cache_the_architecture_cannot_take_is_refused_at_load(model, kv, message, capsys):
    with pytest.raises(CacheError, match=message):
        codecllm.load(model, kv=kv)
    assert main(["generate", model, "-p", "Hello", "--kv", kv]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err


def test_weights_of_another_codec_than_a_checkpoint_is_stored_with_are_refused(tmp_path):
    """compress_model leaves compressed layers as they are, so the asked-for codec would
    silently not apply: an error says so (the same codec, or a partly compressed checkpoint's
    other layers, are fine)."""
    plain = write_random_model("tiny", tmp_path / "m")
    codecllm.compress_checkpoint(plain, tmp_path / "c", codec="huffman", layers="*mlp*", show_progress=False)
    with pytest.raises(ConfigError, match="stored compressed with huffman; weights='nibble'"):
        codecllm.load(tmp_path / "c", weights="nibble")
    model = codecllm.load(tmp_path / "c", weights="huffman")  # the other layers join them
    assert model.stats()["compressed_layers"] == 30


def test_streamed_generate_raises_at_the_call():
    model = codecllm.load("tiny")
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 0"):
        model.generate([1, 2], -1, stream=True)  # not at the first next()


def test_cli_bench_summary_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "tiny", "--device", "cpu", "--weights", "nibble", "--policies", "none,pin:10,all",
                 "--max-new-tokens", "3",
                 "--json", str(out), "--plot", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "RESULTS SUMMARY" in text and "✓ Output matches baseline" in text and "✗" not in text
    assert "Hit rate by cache size" in text and "Memory vs number of compressed blocks" in text
    report = json.loads(out.read_text())
    assert [p["label"] for p in report["policies"]] == ["none", "pin:10", "all"]
    assert (tmp_path / "plots" / "hit_rate.png").exists()


def test_cli_bench_on_a_checkpoint_measures_it_against_its_decoded_original(tmp_path, capsys):
    plain = write_random_model("tiny", tmp_path / "m")
    codecllm.compress_checkpoint(plain, tmp_path / "c", codec="nibble", show_progress=False)
    out = tmp_path / "bench.json"
    assert main(["bench", str(tmp_path / "c"), "--device", "cpu", "--policies", "none", "--max-new-tokens", "3",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Compressed (nibble, cache none)" in text and "✓ Output matches baseline" in text
    report = json.loads(out.read_text())
    assert report["codec"] == "nibble"
    first, last = report["memory"][0], report["memory"][-1]  # no block compressed .. all of them
    assert first["compressed_layers"] == 0 and last["compressed_layers"] > 0
    assert main(["bench", str(tmp_path / "c"), "--weights", "huffman"]) == 1
    assert "stored compressed with nibble; --weights huffman does not apply" in capsys.readouterr().err


def test_chat_reads_until_eof(monkeypatch, capsys):
    answers = iter(["hi there"])

    def fake_input(prompt=""):
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", "tiny", "--max-new-tokens", "3", "--kv", "off"]) == 0
    assert "tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("option, value, message", [("--max-new-tokens", "5000", "must be 1..2047"),
                                                   ("--max-new-tokens", "0", "must be 1..2047"),
                                                   ("--temperature", "-1", "temperature must be >= 0")])
def test_chat_checks_its_arguments_before_it_asks_for_a_line(monkeypatch, capsys, option, value, message):
    def no_input(prompt=""):
        raise AssertionError("asked for a line")

    monkeypatch.setattr("builtins.input", no_input)
    assert main(["chat", "tiny", option, value]) == 1
    assert message in capsys.readouterr().err


def test_cli_bench_kv(tmp_path, capsys):
    out = tmp_path / "kv.json"
    assert main(["bench", "kv", "--lengths", "5,20", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "with cache (tok/s)" in text and "greedy agreement" in text
    report = json.loads(out.read_text())
    quality = {r["kv"]: r for r in report["quality"]}
    assert quality["int8"]["memory_vs_full"] <= 0.55 and quality["int4"]["memory_vs_full"] <= 0.30
    assert quality["on"]["greedy_agreement"] == 1.0


def test_engine_works_without_triton():
    """Triton is an optional dependency: with it absent, models load and generate on the PyTorch
    path (run in a fresh interpreter, since this one has Triton imported already)."""
    import subprocess
    import sys

    script = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'")
sys.meta_path.insert(0, NoTriton())
import codecllm
print(len(codecllm.load("tiny").generate([1, 2, 3], 3)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "3"
