"""Host-RAM weights: one packed block per weight, shared decode state, streaming to the GPU."""

import pytest
import torch

import codecllm
from codecllm.codecs import encode
from codecllm.weights.offload import ALIGN, HostStreamer, packed_block, pin_packed
from tests.conftest import assert_bit_identical, gaussian_weights


@pytest.mark.parametrize("codec", ["huffman", "nibble", "raw"])
def test_packed_encoding_is_one_block_and_decodes_bit_identically(codec):
    w = gaussian_weights(300 * 70).view(300, 70)
    encoded = encode(w, codec)
    packed = pin_packed(encoded, pin=False)
    block, offsets = packed_block(packed)
    assert set(offsets) == set(encoded.buffers) and all(o % ALIGN == 0 for o in offsets.values())
    assert block.numel() <= sum(b.numel() * b.element_size() + ALIGN for b in encoded.buffers.values())
    for name, buf in packed.buffers.items():
        assert buf.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
        assert torch.equal(buf, encoded.buffers[name])
    assert packed.nbytes == encoded.nbytes
    assert_bit_identical(codecllm.decode(packed), w)


def test_only_tight_single_storage_layouts_count_as_packed():
    encoded = encode(gaussian_weights(10_000), "huffman")
    assert packed_block(encoded) is None  # buffers apart
    big = torch.zeros(10**6, dtype=torch.uint8)
    inside = encoded.with_buffers({"data": big[1000:2000]})
    assert packed_block(inside)[0].numel() == 1000  # a view: just its bytes, not the whole storage
    two = encoded.with_buffers({"a": big[:10], "b": big[500_000:500_010]})
    assert packed_block(two) is None  # one storage, far apart: copying the span would be wasteful


def test_copies_of_an_encoding_share_its_decode_table():
    encoded = encode(gaussian_weights(50_000), "huffman")
    copy = pin_packed(encoded, pin=False)
    codecllm.decode(encoded)
    assert copy.shared is encoded.shared and len(encoded.shared) == 1  # built once, for the CPU
    codecllm.decode(copy)
    assert len(copy.shared) == 1


def test_host_storage_on_the_cpu_gives_the_baseline_output():
    prompt = list(b"offload")
    expected = codecllm.load("tiny").generate(prompt, 5)
    model = codecllm.load("tiny", weights="huffman", cache="none", storage="cpu")
    assert model.generate(prompt, 5) == expected


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["auto:0", "none", "lru:7", "auto:1MB"])
def test_streamed_weights_give_the_on_gpu_tokens_repeatably(cache):
    prompt = list(b"streamed from host RAM")
    on_gpu = codecllm.load("tiny", device="cuda", weights="huffman", cache=cache, cuda_graphs=False)
    expected = on_gpu.generate(prompt, 24)
    model = codecllm.load("tiny", device="cuda", weights="huffman", cache=cache, storage="cpu", cuda_graphs=False)
    model.weight_cache.stream_ahead_bytes = 64 * 1024  # a tight bound: the host waits often
    for _ in range(4):  # a moving result would be a race between copy, decode and compute
        assert model.generate(prompt, 24) == expected
    streamer = model.weight_cache._host_streamer
    s = model.stats()
    # every decode took one copy; copies issued ahead for the pass that never came are left over
    assert streamer.copies == s["decompressions"] + len(streamer._issued)
    assert s["bytes_transferred"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["auto:0", "none", "auto:1MB"])
def test_streamed_weights_in_a_cuda_graph_give_the_on_gpu_tokens_repeatably(cache):
    """Pinned host weights are graph-safe: the captured step copies each one over (and with
    auto, copies and decodes the next on the side stream while the current one computes)."""
    prompt = list(b"streamed from host RAM")
    expected = codecllm.load("tiny", device="cuda", weights="huffman", cache=cache).generate(prompt, 24)
    model = codecllm.load("tiny", device="cuda", weights="huffman", cache=cache, storage="cpu")
    assert model.uses_cuda_graphs
    for _ in range(4):  # a moving result would be a race between copy, decode and compute
        assert model.generate(prompt, 24) == expected
    s = model.stats()
    if cache != "auto:1MB":  # nothing kept: every pass moves every weight
        total = sum(w.compressed_nbytes for w in model.weight_cache._weights.values())
        assert s["bytes_transferred"] >= s["forward_passes"] * total


@pytest.mark.gpu
def test_host_streamer_copies_ahead_within_its_bound():
    weights = [gaussian_weights(200_000 + i, seed=i) for i in range(12)]
    encoded = [pin_packed(encode(w, "huffman")) for w in weights]
    limit = 3 * encoded[0].nbytes
    streamer = HostStreamer(torch.device("cuda"), ahead_bytes=limit)
    issued = 0
    for i, enc in enumerate(encoded):
        while issued < len(encoded) and streamer.has_room(encoded[issued].nbytes):
            streamer.issue(issued, encoded[issued])
            issued += 1
            assert streamer._alive_bytes <= limit
        assert issued > i
        with streamer.use(i, enc) as on_gpu:
            assert on_gpu.device.type == "cuda"
            out = codecllm.decode(on_gpu, verify=True)
        assert_bit_identical(out, weights[i])
    assert streamer.copies == len(encoded)
