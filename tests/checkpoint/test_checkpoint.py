"""The checkpoint format: exact round trip of every tensor, selection, and bad input."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import codecllm
from codecllm import checkpoint
from codecllm.errors import CheckpointError
from codecllm.models import ModelConfig, random_state_dict, save_hf_directory
from tests.conftest import assert_bit_identical

TINY = ModelConfig.from_name("tiny").replace(num_hidden_layers=2)


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A HF-layout directory with bf16 weights plus fp32, fp16 and int64 extras and side files."""
    state = random_state_dict(TINY, seed=1)
    state["model.rotary.inv_freq"] = torch.arange(16, dtype=torch.float32)
    state["model.layers.0.extra_fp32.weight"] = torch.randn(8, 16)
    state["model.layers.1.extra_fp16.weight"] = torch.randn(8, 16).half()
    state["model.position_ids"] = torch.arange(10, dtype=torch.int64).view(1, 10)
    path = save_hf_directory(TINY, state, tmp_path / "model")
    (path / "tokenizer.json").write_text('{"fake": true}')
    (path / "generation_config.json").write_text("{}")
    return path


@pytest.mark.parametrize("codec", ["huffman", "nibble", "zstd", "raw"])
def test_round_trip_every_tensor(model_dir, tmp_path, codec):
    out = tmp_path / "out"
    summary = codecllm.compress_checkpoint(model_dir, out, codec=codec, show_progress=False)
    original = checkpoint.load_state_dict(model_dir)
    restored = codecllm.load_state_dict(out)
    assert set(restored) == set(original)
    for name, t in original.items():
        if t.is_floating_point():
            assert_bit_identical(restored[name], t)
        else:
            assert restored[name].dtype == t.dtype and torch.equal(restored[name], t)
    assert (out / "config.json").read_text() == (model_dir / "config.json").read_text()
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    manifest = checkpoint.read_manifest(out)
    # Norms and biases (1-D) and non-float tensors stay as they are.
    assert manifest["tensors"]["model.norm.weight"]["codec"] is None
    assert manifest["tensors"]["model.position_ids"]["codec"] is None
    assert manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["codec"] == codec
    fp32 = manifest["tensors"]["model.layers.0.extra_fp32.weight"]["codec"]
    assert fp32 == (None if codec == "nibble" else codec)
    if codec == "nibble":
        assert any("float32" in reason for reason in summary.kept_uncompressed)
    assert checkpoint.verify_checkpoint(out, show_progress=False).ok


def test_sharded_input_with_index(tmp_path):
    state = random_state_dict(TINY, seed=2)
    path = save_hf_directory(TINY, state, tmp_path / "sharded", max_shard_bytes=200_000)
    assert (path / "model.safetensors.index.json").exists()
    out = tmp_path / "out"
    codecllm.compress_checkpoint(path, out, show_progress=False)
    restored = codecllm.load_state_dict(out)
    for name, t in state.items():
        assert_bit_identical(restored[name], t)


def test_layer_selection(model_dir, tmp_path):
    out = tmp_path / "out"
    codecllm.compress_checkpoint(model_dir, out, layers="0,*lm_head*", show_progress=False)
    tensors = checkpoint.read_manifest(out)["tensors"]
    assert tensors["model.layers.0.self_attn.q_proj.weight"]["codec"] == "huffman"
    assert tensors["lm_head.weight"]["codec"] == "huffman"
    assert tensors["model.layers.1.self_attn.q_proj.weight"]["codec"] is None
    assert tensors["model.embed_tokens.weight"]["codec"] is None


def test_encoder_only_model_any_architecture(tmp_path):
    """Not a decoder: names and shapes the engine does not know still round-trip."""
    state = {
        "bert.embeddings.word_embeddings.weight": torch.randn(100, 32).bfloat16(),
        "bert.encoder.layer.0.attention.self.query.weight": torch.randn(32, 32).bfloat16(),
        "bert.encoder.layer.0.attention.self.query.bias": torch.randn(32).bfloat16(),
        "bert.embeddings.position_ids": torch.arange(64).view(1, 64),
    }
    d = tmp_path / "bert"
    d.mkdir()
    save_file(state, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    codecllm.compress_checkpoint(d, tmp_path / "out", show_progress=False)
    restored = codecllm.load_state_dict(tmp_path / "out")
    for name, t in state.items():
        assert torch.equal(restored[name].view(torch.uint8) if t.is_floating_point() else restored[name],
                           t.view(torch.uint8) if t.is_floating_point() else t)


# ---- bad input ------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        codecllm.compress_checkpoint(tmp_path / "nope", tmp_path / "out")


def test_no_safetensors(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        codecllm.compress_checkpoint(tmp_path / "m", tmp_path / "out")


def test_existing_output_needs_overwrite(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="--overwrite"):
        codecllm.compress_checkpoint(model_dir, out)
    codecllm.compress_checkpoint(model_dir, out, overwrite=True, show_progress=False)
    assert checkpoint.is_checkpoint(out)


def test_failed_compress_leaves_no_partial_output(model_dir, tmp_path):
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 100)  # corrupt input
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="model.safetensors"):
        codecllm.compress_checkpoint(model_dir, out, show_progress=False)
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.fixture
def compressed(model_dir, tmp_path) -> Path:
    out = tmp_path / "out"
    codecllm.compress_checkpoint(model_dir, out, show_progress=False)
    return out


def test_unknown_manifest_version(compressed):
    manifest = json.loads((compressed / "codecllm.json").read_text())
    manifest["version"] = 99
    (compressed / "codecllm.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="version 99"):
        codecllm.load_state_dict(compressed)


def test_truncated_manifest(compressed):
    text = (compressed / "codecllm.json").read_text()
    (compressed / "codecllm.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="codecllm.json"):
        codecllm.load_state_dict(compressed)


def test_missing_weights_file(compressed):
    (compressed / "weights-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights-00001.safetensors"):
        codecllm.load_state_dict(compressed)


def test_truncated_weights_file(compressed):
    f = compressed / "weights-00001.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="weights-00001.safetensors"):
        codecllm.load_state_dict(compressed)


def test_flipped_byte_is_caught_by_checksum(compressed):
    """Flip one byte inside a weight's data: the buffer checksum names file and tensor."""
    f = compressed / "weights-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-1000] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch in tensor"):
        codecllm.load_state_dict(compressed)
    result = checkpoint.verify_checkpoint(compressed, show_progress=False)
    assert not result.ok and "checksum mismatch" in result.failures[0]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a codecllm checkpoint"):
        checkpoint.read_manifest(tmp_path)


def test_compressing_a_checkpoint_again_is_refused(compressed, tmp_path):
    with pytest.raises(CheckpointError, match="already a codecllm checkpoint"):
        codecllm.compress_checkpoint(compressed, tmp_path / "again")


def test_bad_layer_spec(model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="3-1"):
        codecllm.compress_checkpoint(model_dir, tmp_path / "o", layers="3-1")
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


@pytest.mark.parametrize("layers", ["0-x", "*q-proj*", "7-9"])
def test_a_layer_spec_that_selects_nothing_is_refused_before_any_work(model_dir, tmp_path, layers):
    """A typo would otherwise write a checkpoint with nothing compressed (model_dir has blocks 0-1)."""
    with pytest.raises(CheckpointError, match=f"layers '{re.escape(layers)}' selects none of the"):
        codecllm.compress_checkpoint(model_dir, tmp_path / "o", layers=layers, show_progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no output, no partial directory


def test_compress_model_refuses_a_layer_spec_that_selects_nothing():
    from codecllm.models.loader import build_model

    model = build_model(TINY)
    with pytest.raises(CheckpointError, match="selects none of the"):
        codecllm.compress_model(model, layers="*q-proj*")
    assert not hasattr(model, "weight_cache")
