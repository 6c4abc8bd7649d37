"""Compression targets on N(0, 0.02) weights, and clear errors for what codecs do not take."""

import pytest
import torch

import codecllm
from codecllm.errors import CodecError
from tests.conftest import gaussian_weights

WEIGHTS = gaussian_weights(2_000_000, seed=11).view(1000, 2000)


def test_huffman_size_target():
    assert codecllm.encode(WEIGHTS, "huffman").ratio <= 0.68


def test_huffman_lanes_are_shorter_on_small_tensors_only():
    from codecllm.codecs.huffman import SMALL_TENSOR, SMALL_TENSOR_SYMBOLS_PER_LANE, SYMBOLS_PER_LANE

    small = codecllm.encode(gaussian_weights(SMALL_TENSOR), "huffman")
    large = codecllm.encode(gaussian_weights(SMALL_TENSOR + 2), "huffman")
    assert small.meta["symbols_per_lane"] == SMALL_TENSOR_SYMBOLS_PER_LANE
    assert large.meta["symbols_per_lane"] == SYMBOLS_PER_LANE
    # the cost: 32 bits of lane offset per lane, twice as many lanes
    assert 0.006 < small.ratio - large.ratio < 0.0085


def test_nibble_size_target():
    assert codecllm.encode(WEIGHTS, "nibble").ratio <= 0.752


def test_huffman_code_lengths_are_bounded():
    from codecllm.codecs.huffman import CODE_BITS

    t = torch.cat([WEIGHTS.view(-1), torch.tensor([0.0, float("inf"), 1e-38, 1e30]).bfloat16()])
    lengths = codecllm.encode(t, "huffman").buffers["code_lengths"]
    assert int(lengths.max()) <= CODE_BITS


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.float64, torch.bool])
def test_unsupported_dtype_names_dtype_and_valid_ones(dtype):
    with pytest.raises(ValueError, match=str(dtype).removeprefix("torch.")) as info:
        codecllm.encode(torch.zeros(4, dtype=dtype), "huffman")
    assert "bfloat16" in str(info.value)


def test_nibble_refuses_fp16_and_names_alternatives():
    with pytest.raises(CodecError) as info:
        codecllm.encode(torch.zeros(4, dtype=torch.float16), "nibble")
    message = str(info.value)
    assert "float16" in message and "huffman" in message and "zstd" in message and "raw" in message


def test_unknown_codec():
    with pytest.raises(CodecError, match="huffman"):
        codecllm.encode(WEIGHTS, "lz77")
