"""The fused decode-step kernels against the PyTorch ops they replace (interpreter on the CPU).

RoPE rounds exactly where the eager bf16 code rounds, so it must be bit-identical; SiLU*up and
RMSNorm may differ by one bf16 step where exp or the order of the fp32 sum of squares does."""

import pytest
import torch
import torch.nn.functional as F

from codecllm.models.config import ModelConfig
from codecllm.models.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inverse_frequencies
from tests.conftest import bits

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart two same-signed bf16 tensors are, element by element."""
    return (bits(a).int() - bits(b).int()).abs()


def bf16(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


@pytest.mark.parametrize("d", [64, 80, 128])
def test_rope_is_bit_identical_to_eager(d):
    from codecllm.models import fused_kernels as fused

    config = ModelConfig.from_name("tiny").replace(hidden_size=4 * d, num_attention_heads=4, head_dim=d)
    positions = torch.tensor([[5, 6, 7], [0, 1, 2]])
    cos, sin = rope_cos_sin(rope_inverse_frequencies(config), positions, torch.bfloat16)
    x = bf16(2, 3, 4, d, seed=d).transpose(1, 2)  # (B, H, T, D) as a strided view, as in attention
    assert torch.equal(bits(fused.rope(x, cos, sin)), bits(apply_rope(x, cos, sin)))


def test_rms_norm_and_residual_add_match_eager():
    from codecllm.models import fused_kernels as fused

    norm = RMSNorm(1000, 1e-5).to(torch.bfloat16)
    norm.weight.data = bf16(1000, seed=1) + 1
    x, delta = bf16(3, 1000, seed=2, scale=4), bf16(3, 1000, seed=3)
    assert steps_apart(fused.rms_norm(x, norm.weight, norm.eps), norm(x)).max() <= 1
    summed, normed = fused.add_rms_norm(x, delta, norm.weight, norm.eps)
    assert torch.equal(bits(summed), bits(x + delta))
    assert steps_apart(normed, norm(x + delta)).max() <= 1


def test_silu_mul_matches_eager():
    from codecllm.models import fused_kernels as fused

    gate, up = bf16(5000, seed=4, scale=3), bf16(5000, seed=5)
    got, ref = fused.silu_mul(gate, up), F.silu(gate) * up
    apart = steps_apart(got, ref)
    assert apart.max() <= 1 and (apart == 0).float().mean() > 0.99
    special = torch.tensor([float("nan"), 1.0, float("-inf"), 0.0]).bfloat16()
    assert torch.equal(bits(fused.silu_mul(special, special)), bits(F.silu(special) * special))


def test_rope_kv_write_is_rope_plus_the_cache_update():
    """The decode step's q/k RoPE and KV-cache write in one kernel, from views into one fused
    q/k/v row, give the bits of apply_rope + KVCache.update at the slot."""
    from codecllm.kv.cache import KVCache
    from codecllm.models import fused_kernels as fused

    b, h, hkv, d, length = 2, 4, 2, 64, 16
    config = ModelConfig.from_name("tiny").replace(hidden_size=h * d, num_attention_heads=h, head_dim=d)
    cos, sin = rope_cos_sin(rope_inverse_frequencies(config), torch.tensor([[7], [3]]), torch.bfloat16)
    qkv = bf16(b, 1, (h + 2 * hkv) * d, seed=9)
    q, k, v = (t.view(b, 1, -1, d) for t in qkv.split([h * d, hkv * d, hkv * d], dim=-1))
    ours, ref = (KVCache(1, b, hkv, length, d) for _ in range(2))
    for cache in (ours, ref):
        cache.k.normal_(generator=torch.Generator().manual_seed(1))
        cache.slot = torch.tensor([5])
    q_rot = fused.rope_kv_write(q, k, v, cos, sin, ours.k[0], ours.v[0], ours.slot)
    ref.update(0, apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2))
    assert torch.equal(bits(q_rot), bits(apply_rope(q.transpose(1, 2), cos, sin)))
    assert torch.equal(bits(ours.k), bits(ref.k)) and torch.equal(bits(ours.v), bits(ref.v))


@pytest.mark.parametrize("hkv, group, d, splits", [(2, 4, 64, 1), (1, 3, 16, 1), (2, 4, 64, 2), (1, 3, 16, 4),
                                                     (2, 4, 64, 8)])
def test_decode_attention_matches_sdpa_over_the_filled_slots(hkv, group, d, splits, monkeypatch):
    """Our decode-step attention reads positions 0..slot only; SDPA reads the whole static cache
    under the mask. Left padding (masked first positions) and grouped query heads included. Split
    in runs of whole 64-position blocks (131 positions: three blocks, the last of 3 positions):
    2 splits take two blocks and one; 4 and 8 one block each, so sequence 1's first run is wholly
    masked and one program (4) or five (8) have no run."""
    from codecllm.models import fused_kernels as fused

    monkeypatch.setattr(fused, "ATTENTION_BLOCK", 64)
    monkeypatch.setattr(fused, "ATTENTION_MIN_RUN", 64)  # runs of a block (256 by default)
    monkeypatch.setattr(fused, "ATTENTION_SPLIT_FROM", 64)  # (512)
    b, length, slot = 2, 160, 130
    q = bf16(b, hkv * group, 1, d, seed=1)
    k, v = bf16(b, hkv, length, d, seed=2), bf16(b, hkv, length, d, seed=3)
    k[:, :, slot + 1:] = float("nan")  # never written: must not be read
    visible = (torch.arange(length) <= slot)[None, None, None, :].repeat(b, 1, 1, 1)
    visible[1, ..., :70] = False  # sequence 1 is left-padded past the whole first block
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bfloat16).masked_fill_(~visible, float("-inf"))
    assert fused.decode_attention_fits(q, k, mask)
    got = fused.decode_attention(q, k, v, mask, torch.tensor([slot]), splits=splits)
    ref = F.scaled_dot_product_attention(q.float(), k[:, :, :slot + 1].float().repeat_interleave(group, 1),
                                         v[:, :, :slot + 1].float().repeat_interleave(group, 1),
                                         attn_mask=mask[..., :slot + 1].float())
    assert got.shape == q.shape and torch.isfinite(got.float()).all()
    assert ((got.float() - ref).norm() / ref.norm()).item() < 1e-2
    counts = fused.arrival_counters(q.device, 1)
    assert not counts.any()  # every launch leaves its arrival counts at zero for the next


def test_decode_attention_splits_fill_the_gpu_within_the_cache():
    from codecllm.models import fused_kernels as fused

    cpu = torch.device("cpu")  # counted as an H100's 132 SMs
    assert fused.attention_splits(4, 8192, cpu) == 16  # tinyllama at batch 1: at most 16
    assert fused.attention_splits(32, 8192, cpu) == 4  # 32 programs want 5: the power of two below
    assert fused.attention_splits(4, 768, cpu) == 2  # three runs of 256 positions fit
    assert fused.attention_splits(4, 511, cpu) == 1  # never filled far enough to split
    assert fused.attention_splits(256, 8192, cpu) == 1
    with pytest.raises(ValueError, match="splits=3"):
        fused.decode_attention(bf16(1, 2, 1, 16), bf16(1, 1, 8, 16), bf16(1, 1, 8, 16),
                               torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16), torch.tensor([3]), splits=3)


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_finish_step_is_argmax_plus_the_state_update(greedy, dtype, monkeypatch):
    """One launch ends a graph decode step: torch.argmax's pick (ties to the first index, -0.0
    equal to +0.0, NaN largest) over blocks merged by the last program, the position and slot
    counts, and the next step's mask column opened only where padding marks a real token."""
    from codecllm.codecs.kernels.arrivals import arrival_counters
    from codecllm.models import fused_kernels as fused

    monkeypatch.setattr(fused, "ARGMAX_BLOCK", 64)  # several blocks a sequence
    b, v, length = 5, 300, 12
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(1)).to(dtype)
    logits[0, 7] = logits[0, 250] = 40.0  # a tie across blocks: the first
    logits[1, 70] = logits[1, 71] = 40.0  # a tie within a block
    logits[2] = -1.0
    logits[2, 100], logits[2, 5] = 0.0, -0.0  # -0.0 == +0.0: the first
    logits[3, 299] = float("nan")  # NaN beats everything
    logits[4, 0] = 40.0
    logits = logits.repeat(1, 2)[:, :v]  # a strided view: rows v * 2 apart
    padding = torch.ones(b, length, dtype=torch.bool)
    padding[1, :3] = False  # left padding
    padding[3, 9] = False  # not a real position: stays masked
    for start in (4, 8, length - 1):  # the last: no column left to open
        token = torch.full((b, 1), -1, dtype=torch.long)
        position = torch.arange(b).view(b, 1) + 10
        slot = torch.tensor([start])
        mask = torch.where(torch.arange(length) <= start, 0.0, float("-inf")).to(dtype).repeat(b, 1).view(b, 1, 1,
                                                                                                            length)
        before = mask.clone()
        fused.finish_step(logits, token, position, slot, mask, padding, greedy)
        want = logits.argmax(-1, keepdim=True) if greedy else torch.full((b, 1), -1)
        assert token.tolist() == want.tolist()
        if greedy:
            assert token.view(-1).tolist() == [7, 70, 5, 299, 0]
        assert position.view(-1).tolist() == [10 + i + 1 for i in range(b)] and slot.tolist() == [start + 1]
        expected = before.clone()
        if start + 1 < length:
            expected[:, 0, 0, start + 1] = torch.where(padding[:, start + 1], 0.0, float("-inf")).to(dtype)
        assert torch.equal(mask, expected)
        assert int(arrival_counters(logits.device, 1)[0]) == 0  # ready for the next launch
