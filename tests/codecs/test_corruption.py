"""Inconsistent data raises CodecError: decoders never return wrong weights for these."""

import dataclasses

import pytest
import torch

import codecllm
from codecllm.errors import CodecError
from tests.conftest import gaussian_weights

T = gaussian_weights(50_000, seed=5)


def tampered(encoded, name, fn):
    buffers = dict(encoded.buffers)
    buffers[name] = fn(buffers[name].clone())
    return dataclasses.replace(encoded, buffers=buffers)


def shift_offset(offsets):
    offsets[3] += 1
    return offsets


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huffman_bad_lane_offset(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    bad = tampered(codecllm.encode(T, "huffman"), "lane_offsets", shift_offset)
    with pytest.raises(CodecError, match="lane"):
        codecllm.decode(bad, backend=backend)


@pytest.mark.parametrize("offset", [-2**31, 2**31 - 1])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wild_lane_offsets_never_read_outside_the_stream(offset, backend, request):
    """verify=False (the weight cache's path, for checksummed data) skips the checks, but an
    offset far outside the stream still only gives wrong numbers: no IndexError on the CPU, no
    read outside the stream on the GPU (under the interpreter the old kernel crashed the process).
    With the checks, CodecError."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")

    def wild(offsets):
        offsets[3], offsets[0] = offset, offset  # offsets[0] also sets where program 0 warms up
        return offsets

    bad = tampered(codecllm.encode(T, "huffman"), "lane_offsets", wild)
    assert codecllm.decode(bad, backend=backend, verify=False).shape == T.shape
    with pytest.raises(CodecError, match="lane"):
        codecllm.decode(bad, backend=backend)


def test_huffman_truncated_stream():
    bad = tampered(codecllm.encode(T, "huffman"), "stream", lambda s: s[:-10])
    with pytest.raises(CodecError, match="stream"):
        codecllm.decode(bad)


def test_huffman_inconsistent_code_lengths():
    def break_kraft(lengths):
        lengths[:] = 1
        return lengths

    bad = tampered(codecllm.encode(T, "huffman"), "code_lengths", break_kraft)
    with pytest.raises(CodecError, match="Kraft"):
        codecllm.decode(bad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huffman_corrupted_stream_words_detected(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")

    def scramble(stream):
        stream[100:200] = torch.randint(-(2**31), 2**31 - 1, (100,), dtype=torch.int32)
        return stream

    bad = tampered(codecllm.encode(T, "huffman"), "stream", scramble)
    with pytest.raises(CodecError):
        codecllm.decode(bad, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huffman_invalid_codeword_detected(backend, request):
    # One exponent only: a 1-bit code "0", so every peek with a low bit of 1 is invalid.
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    ones = torch.full((5000,), 1.5, dtype=torch.bfloat16)
    bad = tampered(codecllm.encode(ones, "huffman"), "stream", lambda s: torch.full_like(s, -1))
    with pytest.raises(CodecError, match="lane"):
        codecllm.decode(bad, backend=backend)


def test_nibble_escape_mismatch():
    t = T.clone()
    t[::1000] = 0.0  # zeros are outside any window: escapes
    encoded = codecllm.encode(t, "nibble")
    assert encoded.buffers["escape_index"].numel() >= 50
    bad = tampered(encoded, "escape_index", lambda i: i[:-1])
    with pytest.raises(CodecError):
        codecllm.decode(bad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unverified_decode_of_wild_escape_indices_stays_inside_the_tensor(backend, request):
    """verify=False skips the escape checks; an index outside the tensor must still write
    nothing outside it (on the GPU that would corrupt other memory)."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")

    def wild(index):
        index[0], index[1] = 10**7, -5
        return index

    bad = tampered(codecllm.encode(T, "nibble"), "escape_index", wild)
    assert codecllm.decode(bad, backend=backend, verify=False).shape == T.shape
    with pytest.raises(CodecError, match="out of range or not sorted"):
        codecllm.decode(bad, backend=backend)


def test_nibble_missing_buffer():
    encoded = codecllm.encode(T, "nibble")
    buffers = {k: v for k, v in encoded.buffers.items() if k != "codes"}
    with pytest.raises(CodecError, match="codes"):
        codecllm.decode(dataclasses.replace(encoded, buffers=buffers))


def test_zstd_corrupted_frame():
    encoded = codecllm.encode(T, "zstd")

    def flip(data):
        data[len(data) // 2] ^= 0xFF
        return data

    with pytest.raises(CodecError):
        codecllm.decode(tampered(encoded, "data", flip))
