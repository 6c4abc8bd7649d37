"""On a CUDA machine: the GPU decoders are used for CUDA targets and are bit-identical."""

import pytest
import torch

import codecllm
from codecllm.codecs import codecs_for, gpu_available
from tests.conftest import assert_bit_identical, gaussian_weights, random_bits

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_decode_bit_identical(dtype):
    assert gpu_available()
    for t in (gaussian_weights(3_000_001, dtype), random_bits(1_000_003, dtype)):
        for codec in codecs_for(dtype):
            encoded = codecllm.encode(t, codec).to("cuda")
            out = codecllm.decode(encoded)
            assert out.device.type == "cuda"
            assert_bit_identical(out, t)


def test_gpu_decode_detects_bad_offsets():
    import dataclasses

    from codecllm.errors import CodecError

    encoded = codecllm.encode(gaussian_weights(100_000), "huffman")
    offsets = encoded.buffers["lane_offsets"].clone()
    offsets[5] += 3
    bad = dataclasses.replace(encoded, buffers={**encoded.buffers, "lane_offsets": offsets}).to("cuda")
    with pytest.raises(CodecError, match="lane"):
        codecllm.decode(bad)
