"""The Triton decoders, run on the CPU by the interpreter, match the PyTorch reference bit for bit."""

import pytest
import torch

import codecllm
from codecllm.codecs import codecs_for
from tests.conftest import assert_bit_identical, gaussian_weights, random_bits

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("codec", ["huffman", "nibble"])
def test_every_bf16_bit_pattern_triton(codec):
    t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert_bit_identical(codecllm.decode(codecllm.encode(t, codec), backend="triton"), t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 4099])
def test_triton_matches_reference(dtype, n):
    for t in (gaussian_weights(n, dtype, seed=n), random_bits(n, dtype, seed=n + 1)):
        for codec in codecs_for(dtype):
            if codec == "zstd":
                continue
            encoded = codecllm.encode(t, codec)
            reference = codecllm.decode(encoded, backend="torch")
            assert_bit_identical(codecllm.decode(encoded, backend="triton"), reference)
            assert_bit_identical(reference, t)


@pytest.mark.parametrize("symbols_per_lane", [2, 128, 256])
def test_huffman_any_lane_length_decodes_bit_identically(symbols_per_lane):
    from codecllm.codecs.base import EncodedTensor
    from codecllm.codecs.huffman import HuffmanCodec

    t = gaussian_weights(5000, seed=symbols_per_lane).view(50, 100)
    buffers, meta, tiles = HuffmanCodec(symbols_per_lane).encode(t.reshape(-1))
    encoded = EncodedTensor("huffman", t.dtype, tuple(t.shape), buffers, meta, tiles)
    assert encoded.meta["symbols_per_lane"] == symbols_per_lane
    assert_bit_identical(codecllm.decode(encoded, backend="torch"), t)
    assert_bit_identical(codecllm.decode(encoded, backend="triton"), t)


def test_zstd_has_no_gpu_decoder():
    from codecllm.errors import CodecError

    with pytest.raises(CodecError, match="no GPU decoder"):
        codecllm.decode(codecllm.encode(gaussian_weights(10), "zstd"), backend="triton")
