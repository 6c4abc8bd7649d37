import os

import torch

# Triton picks interpreter or compiler when a kernel is defined, so this must be set before any
# codecllm kernel module is imported: on machines without CUDA every kernel runs interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor, for bit-exact comparison."""
    return t.contiguous().view(INT_VIEW[t.dtype])


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(bits(a.cpu()), bits(b.cpu())), "decoded bits differ from the original"


def random_bits(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Uniformly random bit patterns: every exponent, NaN payloads, subnormals, infinities."""
    g = torch.Generator().manual_seed(seed)
    width = torch.finfo(dtype).bits
    raw = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1), (n,), generator=g, dtype=torch.int64)
    return raw.to(INT_VIEW[dtype]).view(dtype)


def gaussian_weights(n: int, dtype=torch.bfloat16, std: float = 0.02, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * std).to(dtype)


def force_tma_launches(monkeypatch, warps: int) -> list:
    """Every nibble launch takes the TMA-fed kernel at `warps` a program (gemv._tma_warps patched);
    returns the list that records the warps of each TMA launch really made."""
    from codecllm.codecs.kernels import gemv

    monkeypatch.setattr(gemv, "_tma_warps", lambda *args: warps)
    launched, real_launch = [], gemv._launch_tma
    monkeypatch.setattr(gemv, "_launch_tma", lambda *args: launched.append(args[4]) or real_launch(*args))
    return launched


@pytest.fixture
def triton_interpreter():
    """Kernels on CPU tensors through Triton's interpreter (CPU machines; GPU tests cover CUDA)."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels are compiled for the GPU in this process; the gpu tests run them")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

