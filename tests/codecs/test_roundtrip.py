"""Every codec returns every bit: all bf16 patterns, random fp16/fp32 patterns, any shape."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import codecllm
from codecllm.codecs import CODECS, codecs_for
from tests.conftest import assert_bit_identical, gaussian_weights, random_bits

ALL_BF16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_bf16_bit_pattern(codec):
    encoded = codecllm.encode(ALL_BF16, codec)
    assert_bit_identical(codecllm.decode(encoded), ALL_BF16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("codec", ["huffman", "zstd", "raw"])
def test_random_fp16_fp32_bit_patterns(codec, dtype):
    t = random_bits(70_001, dtype, seed=3)
    assert_bit_identical(codecllm.decode(codecllm.encode(t, codec)), t)


def test_every_fp16_bit_pattern_huffman():
    t = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    assert_bit_identical(codecllm.decode(codecllm.encode(t, "huffman")), t)


SHAPES = [(), (0,), (1,), (3, 0, 2), (7,), (5, 3), (257,), (2, 3, 5, 7), (1000, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("codec", list(CODECS))
def test_shapes(codec, shape):
    n = 1
    for s in shape:
        n *= s
    t = gaussian_weights(max(n, 1))[:n].view(shape)
    encoded = codecllm.encode(t, codec)
    assert encoded.shape == tuple(shape) and encoded.dtype == torch.bfloat16
    assert_bit_identical(codecllm.decode(encoded), t)


@pytest.mark.parametrize("codec", list(CODECS))
def test_non_contiguous_input(codec):
    base = gaussian_weights(64 * 48).view(64, 48)
    for t in (base.t(), base[::3, 1::2], base[:, 5]):
        assert not t.is_contiguous()
        assert_bit_identical(codecllm.decode(codecllm.encode(t, codec)), t)


SPECIALS = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 5e-45, 3e38, 1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_special_values_and_nan_payloads(dtype):
    t = torch.cat([torch.tensor(SPECIALS).to(dtype), gaussian_weights(3000, dtype)])
    # NaNs with different payloads and signs, built from bits.
    nan_bits = {torch.bfloat16: [0x7FC1, -0x0001, 0x7F81], torch.float16: [0x7E01, -0x0002, 0x7C01],
                torch.float32: [0x7FC00001, -0x00000003, 0x7F800001]}[dtype]
    view = {torch.float32: torch.int32}.get(dtype, torch.int16)
    t = torch.cat([t, torch.tensor(nan_bits, dtype=view).view(dtype)])
    for codec in codecs_for(dtype):
        assert_bit_identical(codecllm.decode(codecllm.encode(t, codec)), t)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 3000),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**31),
    gaussian=st.booleans(),
)
def test_roundtrip_property(n, dtype, seed, gaussian):
    t = gaussian_weights(n, dtype, seed=seed) if gaussian else random_bits(n, dtype, seed=seed)
    for codec in codecs_for(dtype):
        assert_bit_identical(codecllm.decode(codecllm.encode(t, codec)), t)


def test_encoded_tensor_reports_sizes():
    t = gaussian_weights(10_000).view(100, 100)
    encoded = codecllm.encode(t, "huffman")
    assert encoded.codec == "huffman" and encoded.shape == (100, 100)
    assert encoded.original_nbytes == 20_000
    assert encoded.nbytes == sum(b.nbytes for b in encoded.buffers.values()) + len(
        __import__("json").dumps(encoded.meta, separators=(",", ":"))
    )
    assert encoded.tiles >= 1


@pytest.mark.parametrize("codec", ["nibble", "huffman"])
def test_cpu_decoders_join_their_chunks_exactly(codec, monkeypatch):
    """The CPU decoders work a chunk at a time (nibble: CHUNK elements, huffman: DECODE_LANES
    lanes); tiny chunks here, so every chunk boundary (an odd element count, escapes and lanes on
    both sides) is crossed many times."""
    t = gaussian_weights(4097 * 3, seed=5)
    t.view(torch.int16)[::13] = -1  # NaN payloads: escapes for nibble, rare symbols for huffman
    encoded = codecllm.encode(t, codec)
    whole = codecllm.decode(encoded, "cpu")
    if codec == "nibble":  # codes bytes a chunk
        monkeypatch.setattr("codecllm.codecs.nibble.CHUNK", 256)
    else:  # lanes a chunk
        monkeypatch.setattr("codecllm.codecs.huffman.DECODE_LANES", 2)
    encoded.derived.clear()
    assert_bit_identical(codecllm.decode(encoded, "cpu"), t)
    assert_bit_identical(whole, t)
