"""The command line: happy paths print tables; user mistakes print one line and exit 1."""

import pytest

from codecllm.cli import main
from codecllm.models import ModelConfig, write_random_model


@pytest.fixture
def model_dir(tmp_path):
    return write_random_model(ModelConfig.from_name("tiny").replace(num_hidden_layers=1), tmp_path / "m")


def test_compress_inspect_verify(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(model_dir), str(out), "--codec", "nibble"]) == 0
    assert "compressed with nibble" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.0.mlp.up_proj.weight" in text and "total:" in text
    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_compare_named_config(capsys):
    assert main(["compare", "tiny", "--codecs", "nibble,raw"]) == 0
    text = capsys.readouterr().out
    assert "Codec comparison" in text and "| nibble" in text and "| raw" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "no-such-model", "out"], "named configs"),
        (["inspect", "."], "not a codecllm checkpoint"),
        (["verify", "/nonexistent"], "not a codecllm checkpoint"),
    ],
)
def test_user_mistakes_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_verify_reports_corruption(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(["compress", str(model_dir), str(out)])
    f = out / "weights-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-500] ^= 0x10
    f.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out
