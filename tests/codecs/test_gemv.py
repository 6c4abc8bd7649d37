"""The fused nibble GEMV and the plain Triton GEMV against an fp64 reference (interpreter on the CPU).

fp32 inputs and outputs keep the check exact: the kernel decodes each weight by bit operations
and accumulates in fp32, so anything but rounding-level error is a decoding bug (escapes too)."""

import pytest
import torch

import codecllm
from tests.conftest import bits, force_tma_launches, gaussian_weights

pytestmark = pytest.mark.usefixtures("triton_interpreter")


def weights_with_escapes(n: int, k: int, seed: int) -> torch.Tensor:
    w = gaussian_weights(n * k, seed=seed).view(n, k)
    w[0, 3] = 0.0
    w[n // 2, k - 1] = -0.0
    w[-1, -1] = 1e-30  # far below the exponent window: escaped
    w[-1, 0] = 3.0  # far above it
    w[1, 1] = -5e-31  # escapes in every slot of a 4-weight word, negative ones too
    w[2, 2] = -7.0
    return w


SPLIT_K = (16, 64, 4, 3, True)  # tensor-core tiles, K cut in 3 spans summed by a second kernel
PREFETCH = (16, 128, 4, 2, True, 1)  # two MMA steps a loop turn: the next turn's loads run ahead
CUDA_CORES = (4, 64, 2, 1, False)  # batches on CUDA cores: each weight decoded once, B FMAs
TWO_ROWS = (2, 2048, 2, 1, False)  # batch 2's choice up to 2048 rows: a whole row of 2048 a turn


@pytest.mark.parametrize("n, k, batch, config", [(6, 64, 1, None), (33, 200, 3, None), (17, 1032, 8, None),
                                                 (5, 2052, 1, None), (3, 2052, 2, None), (33, 200, 3, SPLIT_K),
                                                 (17, 1032, 8, SPLIT_K), (33, 200, 3, CUDA_CORES),
                                                 (32, 512, 4, None), (48, 2048, 8, None), (17, 1032, 8, PREFETCH),
                                                 (32, 2048, 5, PREFETCH), (6, 2048, 2, TWO_ROWS)])
def test_fused_nibble_gemv_matches_reference(n, k, batch, config):
    from codecllm.codecs.kernels.gemv import NibbleGemvWeight, gemv

    w = weights_with_escapes(n, k, seed=n)
    encoded = codecllm.encode(w, "nibble")
    assert encoded.buffers["escape_index"].numel() >= 5
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(k)).bfloat16()
    ref = x.double() @ w.double().T
    for y in (NibbleGemvWeight(encoded)(x, out_dtype=torch.float32, config=config),
              gemv(x.float(), w.float(), config=config)):
        assert y.shape == (batch, n)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_fused_policy_uses_the_gemv_for_decode_steps(tmp_path, monkeypatch):
    from codecllm.codecs.kernels import gemv as kernels
    from codecllm.models import ModelConfig, write_random_model

    # A very small model: the interpreter runs every GEMV program in Python.
    config = ModelConfig.from_name("tiny").replace(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    path = write_random_model(config, tmp_path / "m")
    plain = codecllm.load(path)
    fused = codecllm.load(path, weights="nibble", cache="fused")
    prompt = [1, 2, 3]
    launches = []
    group = kernels.gemv_group
    monkeypatch.setattr(kernels, "gemv_group", lambda x, w, gated=False, **kw: launches.append(
        (len(w), gated)) or group(x, w, gated=gated, **kw))
    # Both paths compute from the same bf16 weights; greedy tokens agree on this model, and no
    # decompressed copy is kept.
    assert fused.generate(prompt, 3) == plain.generate(prompt, 3)
    s = fused.stats()
    # 3 passes x (8 linears + the embedding lookup) (prompt <= 8 rows)
    assert s["fused_calls"] == 3 * 9 and s["cache_entries"] == 0
    # per pass: q/k/v in one launch, gate/up with SiLU in one, then o, down and lm_head alone
    assert launches == 3 * [(3, False), (1, False), (2, True), (1, False), (1, False)]


def test_plain_gemv_odd_in_features():
    from codecllm.codecs.kernels.gemv import gemv

    w = torch.randn(9, 131)
    x = torch.randn(2, 131)
    ref = x.double() @ w.double().T
    assert ((gemv(x, w).double() - ref).norm() / ref.norm()).item() < 1e-6


def test_fused_nibble_gemv_refuses_what_it_cannot_take():
    from codecllm.codecs.kernels.gemv import NibbleGemvWeight, nibble_gemv_supported

    with pytest.raises(ValueError, match="divisible by 4, got \\(4, 10\\)"):
        NibbleGemvWeight(codecllm.encode(torch.randn(4, 10).bfloat16(), "nibble"))
    huge = torch.full((4, 8), 2.0**127).bfloat16()  # exponent 254: window base 240
    assert "base below 240" in nibble_gemv_supported(codecllm.encode(huge, "nibble"))


@pytest.mark.parametrize("batch, config", [(1, None), (8, None), (8, SPLIT_K), (8, CUDA_CORES), (8, PREFETCH)])
def test_fused_nibble_gemv_reads_weights_exactly(batch, config):
    """One-hot inputs pick out single columns: one product per output, so the result must be the
    weight itself, bit for bit (a sum that starts at +0 gives +0 for -0, as cuBLAS does), in all
    four slots of a packed word, at tile edges and at every escape."""
    from codecllm.codecs.kernels.gemv import NibbleGemvWeight

    n, k = 12, 1032
    w = weights_with_escapes(n, k, seed=7)
    fused = NibbleGemvWeight(codecllm.encode(w, "nibble"))
    columns = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 510, 511, 512, 513, 1023, 1024, k - 2, k - 1])
    for group in columns.split(batch):
        x = torch.zeros(group.numel(), k, dtype=torch.bfloat16)
        x[torch.arange(group.numel()), group] = 1.0
        expected = w[:, group].T.contiguous()
        expected = torch.where(expected == 0, torch.zeros_like(expected), expected)
        assert torch.equal(bits(fused(x, config=config)), bits(expected)), group


def test_gemv_linear_takes_the_triton_kernel_inside_graph_steps_up_to_8_rows(monkeypatch):
    from codecllm.codecs.kernels import gemv as kernels
    from codecllm.weights.fast_linear import GemvLinear, graph_step

    calls = []
    monkeypatch.setattr(kernels, "gemv", lambda x, w: calls.append(x.shape) or torch.nn.functional.linear(x, w))
    linear = torch.nn.Linear(64, 8, bias=True)
    linear.__class__ = GemvLinear
    one, four, nine = torch.randn(1, 1, 64), torch.randn(4, 64), torch.randn(9, 64)
    linear(one)  # outside a graph step: cuBLAS (its host launch cost is lower)
    with graph_step():
        ref = torch.nn.functional.linear(one, linear.weight, linear.bias)
        assert torch.allclose(linear(one), ref)
        linear(four)
        linear(nine)  # more rows than the kernel takes: cuBLAS
    assert calls == [(1, 1, 64), (4, 64)]


def test_load_checks_the_gemv_option():
    from codecllm.errors import ConfigError

    with pytest.raises(ConfigError, match="gemv must be 'auto' or 'cublas', got 'fast'"):
        codecllm.load("tiny", gemv="fast")


@pytest.mark.parametrize("nibble", [False, True])
@pytest.mark.parametrize("batch, config", [(1, None), (3, None), (3, SPLIT_K), (3, CUDA_CORES)])
def test_gemv_group_is_the_separate_gemvs_side_by_side(nibble, batch, config):
    """One launch over up to three matrices (q/k/v) runs each one's rows through the same loop
    as a separate call, so the outputs must be the separate outputs, bit for bit."""
    from codecllm.codecs.kernels.gemv import NibbleGemvWeight, gemv, gemv_group

    k = 200  # not a multiple of the tile: masked loads at the edge
    mats = [weights_with_escapes(n, k, seed=n) for n in (9, 4, 4)]
    weights = [NibbleGemvWeight(codecllm.encode(w, "nibble")) for w in mats] if nibble else mats
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(1)).bfloat16()

    def one(w):
        return w(x, out_dtype=torch.float32, config=config) if nibble else gemv(x.float(), w.float(), config=config)

    for count in (2, 3):
        together = gemv_group(x, weights[:count], out_dtype=torch.float32, config=config) if nibble else \
            gemv_group(x.float(), [w.float() for w in weights[:count]], config=config)
        assert torch.equal(bits(together), bits(torch.cat([one(w) for w in weights[:count]], dim=-1)))


@pytest.mark.parametrize("nibble", [False, True])
@pytest.mark.parametrize("config", [None, SPLIT_K, CUDA_CORES, PREFETCH])
@pytest.mark.parametrize("batch", [1, 2])
def test_gated_gemv_is_silu_of_gate_times_up(nibble, config, batch):
    """gate/up in one launch with SiLU(gate) * up applied to the rounded bf16 outputs, as the
    eager ops do; SiLU's exp may differ by one bf16 step. At batch 1 on CUDA cores gate and up
    share a loop, and rows without escapes skip the escapes' gather (some of the 12 rows here
    have escapes, some have none)."""
    import torch.nn.functional as F

    from codecllm.codecs.kernels.gemv import NibbleGemvWeight, gemv, gemv_group

    k = 256
    gate, up = weights_with_escapes(12, k, seed=3) * 40, weights_with_escapes(12, k, seed=4)
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    if nibble:
        pair = [NibbleGemvWeight(codecllm.encode(w, "nibble")) for w in (gate, up)]
        g, u = (w(x, out_dtype=torch.float32, config=config).bfloat16() for w in pair)
    else:
        pair = [gate, up]
        g, u = (gemv(x.float(), w.float(), config=config).bfloat16() for w in pair)  # rounded as torch rounds
    got, ref = gemv_group(x, pair, gated=True, config=config), F.silu(g) * u
    apart = (bits(got).int() - bits(ref).int()).abs()
    assert got.dtype == torch.bfloat16 and apart.max() <= 1 and (apart == 0).float().mean() > 0.9


def test_gemv_group_refuses_mismatched_weights():
    from codecllm.codecs.kernels.gemv import gemv_group

    x = torch.randn(1, 16).bfloat16()
    expected = r"1-3 weights of one kind with 16 input features, got \[\(4, 16\), \(4, 8\)\]"
    with pytest.raises(ValueError, match=expected):
        gemv_group(x, [torch.randn(4, 16), torch.randn(4, 8)])
    with pytest.raises(ValueError, match="two weights of one shape"):
        gemv_group(x, [torch.randn(4, 16), torch.randn(5, 16)], gated=True)


def test_nibble_rows_are_the_embedding_rows_bit_for_bit():
    """The fused policy's embedding lookup decodes only the rows it needs, escapes included."""
    from codecllm.codecs.kernels.gemv import NibbleGemvWeight

    table = weights_with_escapes(40, 132, seed=5)
    ids = torch.tensor([[39, 0, 1], [2, 20, 39]])
    got = NibbleGemvWeight(codecllm.encode(table, "nibble")).rows(ids)
    assert torch.equal(bits(got), bits(torch.nn.functional.embedding(ids, table)))


def test_fused_nibble_gemv_tile_with_more_escapes_than_its_slots(monkeypatch):
    """The kernels read a tile's first escapes from fixed slots before their main loop and the
    rest after it, a slot-width chunk at a time: a tile with 70 of them and 16 slots, across split
    spans, at batch 1 and in the row lookup, must still read every weight exactly."""
    from codecllm.codecs.kernels.gemv import EscapeTable, NibbleGemvWeight

    monkeypatch.setattr(EscapeTable, "WIDTHS", (16,))
    n, k = 16, 512
    w = weights_with_escapes(n, k, seed=3)
    w[5, ::8] = 1e-30  # 64 escapes in one row, 6 more in others
    w[9, 100:106] = -3.0
    fused = NibbleGemvWeight(codecllm.encode(w, "nibble"))
    assert fused.escape_table.slots == 16 and fused.escapes > 4 * 16
    for config in (None, (16, 64, 4, 2, True), PREFETCH):
        for cols in (torch.arange(0, 64, 8), torch.tensor([100, 101, 102, 103, 104, 105, 256, 511])):
            x = torch.zeros(cols.numel(), k, dtype=torch.bfloat16)
            x[torch.arange(cols.numel()), cols] = 1.0
            expected = w[:, cols].T.contiguous()
            expected = torch.where(expected == 0, torch.zeros_like(expected), expected)
            assert torch.equal(bits(fused(x, config=config)), bits(expected)), (config, cols)
    for i in (0, 5):  # batch 1 (CUDA cores), the same table
        x = torch.zeros(1, k, dtype=torch.bfloat16)
        x[0, 8 * i] = 1.0
        assert torch.equal(bits(fused(x)), bits(w[:, 8 * i][None] + 0.0)), i
    assert torch.equal(bits(fused.rows(torch.arange(n))), bits(w))  # the embedding lookup too


@pytest.mark.parametrize("nibble", [True, False])
def test_split_k_sums_in_the_kernel_the_same_every_call(nibble):
    """With K split, the last split of each row block adds the partial sums (no second launch):
    every call gives the same bits, and the arrival counters are back at zero after each."""
    from codecllm.codecs.kernels import gemv as module
    from codecllm.codecs.kernels.arrivals import arrival_counters

    n, k = 40, 1032
    w = weights_with_escapes(n, k, seed=11)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(5)).bfloat16()
    weight = module.NibbleGemvWeight(codecllm.encode(w, "nibble")) if nibble else w
    outs = [module.gemv_group(x, [weight, weight], config=SPLIT_K) for _ in range(2)]
    assert torch.equal(bits(outs[0]), bits(outs[1]))
    assert not arrival_counters(x.device, 1).any()
    ref = x.double() @ w.double().T
    assert ((outs[0][:, :n].double() - ref).norm() / ref.norm()).item() < 1e-2


def test_pdl_launches_only_on_cuda_and_not_when_switched_off(monkeypatch):
    from codecllm.codecs.kernels import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}  # no launch_pdl for the interpreter
    monkeypatch.setenv("CODECLLM_PDL", "0")
    assert not pdl.enabled(torch.device("cuda"))


def _run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """The 32-bit integer PTX the GEMV kernels inline (prmt, and, mad.lo, lop3), run in Python."""
    import re

    regs = dict(inputs)
    mask = 0xFFFFFFFF

    def value(operand: str) -> int:
        return regs[operand] if operand in regs else int(operand, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [a.strip() for a in rest.split(",")]
        a = [value(v) for v in args]
        if op == "prmt.b32":  # byte i of the result: byte (selector nibble i) of b:a
            pool = a[0] | a[1] << 32
            regs[dst] = sum(((pool >> 8 * ((a[2] >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "and.b32":
            regs[dst] = a[0] & a[1]
        elif op == "mad.lo.u32":
            regs[dst] = (a[0] * a[1] + a[2]) & mask
        elif op == "lop3.b32":  # bit by bit, the truth table a[3] at index (a << 2 | b << 1 | c)
            regs[dst] = sum(((a[3] >> ((a[0] >> i & 1) << 2 | (a[1] >> i & 1) << 1 | (a[2] >> i & 1))) & 1) << i
                            for i in range(32))
        else:
            raise AssertionError(f"no emulation of {op!r} ({line!r})")
        assert re.fullmatch(r"\w+|\$\d", dst), dst
    return regs


def test_ptx_decode_gives_each_weights_bf16_bits():
    """The PTX decode the GPU runs (byte permutes and a lop3 select), emulated instruction by
    instruction on the CPU: each word of four sign+mantissa bytes and four 4-bit codes gives the
    pairs (w0, w2), (w1, w3) of bf16 weights, sign and mantissa from the byte, exponent code + base.
    The interpreter runs the integer form of the same decode (the tests above); the GPU tests
    compare the two bit for bit."""
    import random

    from codecllm.codecs.kernels.gemv import _PAIRS_PTX

    rng = random.Random(0)
    for _ in range(2000):
        word, base = rng.getrandbits(32), rng.randrange(0, 241)
        codes = [rng.randrange(0, 15) for _ in range(4)]  # 15 is the escape: its weight comes from the table
        packed_codes = sum(c << 4 * j for j, c in enumerate(codes)) | rng.getrandbits(16) << 16
        weight = [((word >> 8 * j & 0x80) << 8) | (codes[j] + base) << 7 | (word >> 8 * j & 0x7F) for j in range(4)]
        regs = _run_ptx(_PAIRS_PTX.value, {"$2": word, "$3": packed_codes, "$4": base << 7 | base << 23})
        assert (regs["$0"], regs["$1"]) == (weight[0] | weight[2] << 16, weight[1] | weight[3] << 16), hex(word)


def test_which_launches_let_the_next_kernel_in_late():
    """PDL trigger placement (_late_trigger): gate/up launches let down launch after their loops,
    but nibble's on CUDA cores below EARLY_GATED_WEIGHTS (tinyllama's at batch 1, 23 M weights)
    let it in right after their wait; the 8B's (117 M) stay late. Non-gated launches trigger
    early, but nibble ones on tensor cores of LATE_TRIGGER_WEIGHTS or more."""
    from codecllm.codecs.kernels.gemv import _late_trigger

    tinyllama_gate_up, llama8b_gate_up = 2 * 5632 * 2048, 2 * 14336 * 4096
    assert not _late_trigger(nibble=True, gated=True, use_dot=False, weights=tinyllama_gate_up)
    assert _late_trigger(nibble=True, gated=True, use_dot=False, weights=llama8b_gate_up)
    assert _late_trigger(nibble=True, gated=True, use_dot=True, weights=tinyllama_gate_up)
    assert _late_trigger(nibble=False, gated=True, use_dot=False, weights=tinyllama_gate_up)
    assert not _late_trigger(nibble=True, gated=False, use_dot=False, weights=128256 * 4096)
    assert _late_trigger(nibble=True, gated=False, use_dot=True, weights=14336 * 4096)
    assert not _late_trigger(nibble=True, gated=False, use_dot=True, weights=2048 * 2048)
    assert not _late_trigger(nibble=False, gated=False, use_dot=True, weights=14336 * 4096)


@pytest.mark.parametrize("warps", [1, 2, 4])
@pytest.mark.parametrize("batch", [2, 4, 8])
def test_tma_fed_nibble_gemv_is_the_register_kernel_bit_for_bit(monkeypatch, warps, batch):
    """Large launches at batches 2-8 read their tiles through TMA descriptors (_nibble_tma_kernel):
    same warps, K order, MMA steps and escapes as the register kernel at that many warps, so the
    same bits; a matrix, q/k/v in one launch (rows not a multiple of the 16-row tile: TMA reads
    zeros past the last row), and gate/up; weights exact against fp64 (escapes in every tile,
    a tile with more escapes than its slots)."""
    import torch.nn.functional as F

    from codecllm.codecs.kernels.gemv import EscapeTable, NibbleGemvWeight, gemv_group

    monkeypatch.setattr(EscapeTable, "WIDTHS", (16,))
    launched = force_tma_launches(monkeypatch, warps)
    k = 512
    mats = [weights_with_escapes(n, k, seed=n) for n in (40, 9, 16)]
    mats[0][3, ::8] = 1e-30  # 64 escapes in one row: past the tile's 16 slots
    weights = [NibbleGemvWeight(codecllm.encode(w, "nibble")) for w in mats]
    x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch)).bfloat16()
    register = (16, 128, warps, 1, True, 1)
    for group in (weights[:1], weights):
        got = gemv_group(x, group, out_dtype=torch.float32)
        assert torch.equal(bits(got), bits(gemv_group(x, group, out_dtype=torch.float32, config=register)))
    ref = x.double() @ mats[0].double().T
    got = weights[0](x, out_dtype=torch.float32)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-6
    pair = [NibbleGemvWeight(codecllm.encode(w, "nibble")) for w in (mats[2] * 40, mats[2])]
    got = gemv_group(x, pair, gated=True)
    assert torch.equal(bits(got), bits(gemv_group(x, pair, gated=True, config=register)))
    g, u = (w(x, out_dtype=torch.float32, config=register).bfloat16() for w in pair)
    assert (bits(got).int() - bits(F.silu(g) * u).int()).abs().max() <= 1
    assert launched == [warps] * 4  # the calls without a config took the TMA kernel


def test_tma_fed_launches_are_the_large_ones_at_batches_2_to_8():
    from codecllm.codecs.kernels.gemv import _tma_warps

    assert _tma_warps(4096, 14336, 8, False, 1) == 4  # the 8B's down
    assert _tma_warps(14336, 4096, 4, True, 2) == 1  # the 8B's gate/up
    assert _tma_warps(32000, 2048, 4, False, 1) == 4  # tinyllama's lm_head
    assert _tma_warps(4096, 4096, 8, False, 1) == 4  # the 8B's o
    # single matrices of about one wave of programs: 2 warps
    assert _tma_warps(5632, 2048, 8, False, 1) == 2
    assert _tma_warps(14336, 4096, 4, False, 1) == 2
    assert _tma_warps(2048, 5632, 8, False, 1) == 4  # tinyllama's down above batch 4
    assert _tma_warps(2048, 5632, 4, False, 1) is None  # and not at batch 4
    assert _tma_warps(2048, 2048, 8, False, 1) is None  # tinyllama's o
    assert _tma_warps(6144, 4096, 8, False, 3) is None  # q/k/v: the register kernel
    assert _tma_warps(5632, 2048, 8, True, 2) is None  # tinyllama's gate/up
    assert _tma_warps(4096, 14336, 2, False, 1) == 4  # batch 2: the same launches
    assert _tma_warps(5632, 2048, 2, False, 1) is None  # but the one-wave ones
    assert _tma_warps(4096, 14336, 1, False, 1) is None  # batch 1: CUDA cores
    assert _tma_warps(4096, 4100, 8, False, 1) is None  # K not in whole turns of the warps
