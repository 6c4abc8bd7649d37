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


def test_fused_gemv_error_within_cublas_bound():
    import torch.nn.functional as F

    from codecllm.codecs.kernels.gemv import NibbleGemvWeight, gemv

    for n, k, batch in [(4096, 4096, 1), (1024, 4096, 8), (2048, 5632, 3)]:
        w = gaussian_weights(n * k, seed=n).view(n, k).cuda()
        x = torch.randn(batch, k, device="cuda").bfloat16()
        ref = x.double() @ w.double().T
        err = lambda y, ref=ref: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        bound = err(F.linear(x, w)) + 1e-3
        assert err(NibbleGemvWeight(codecllm.encode(w, "nibble").to("cuda"))(x)) <= bound
        assert err(gemv(x, w)) <= bound


def test_cuda_graph_decode_matches_eager_for_every_graph_safe_policy():
    eager = codecllm.load("tiny", device="cuda", cuda_graphs=False)
    prompt = list(b"graphs")
    expected = eager.generate(prompt, 24)
    for weights, cache in [(None, "none"), ("nibble", "fused"), ("huffman", "none"), ("huffman", "pin:10"),
                           ("nibble", "all")]:
        model = codecllm.load("tiny", device="cuda", weights=weights, cache=cache, cuda_graphs=True)
        assert model.uses_cuda_graphs
        for _ in range(3):  # repeated runs must not drift (a moving result is a race)
            assert model.generate(prompt, 24) == expected, (weights, cache)
        s = model.stats()
        assert s["forward_passes"] == 3 * 24


def test_auto_prefetch_is_race_free_under_repetition():
    expected = codecllm.load("tiny", device="cuda").generate(list(b"prefetch"), 32)
    model = codecllm.load("tiny", device="cuda", weights="huffman", cache="auto:1MB")
    for _ in range(5):
        assert model.generate(list(b"prefetch"), 32) == expected
    assert model.stats()["prefetch_hits"] > 0
