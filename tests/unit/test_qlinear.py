"""Oracle tests for the quantized-linear plans: every plan, every quant type, against
``gguf.quants.dequantize`` + ``F.linear``; folded LoRAs against the separate low-rank path."""

import dataclasses

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType

from lora_ops.dequant import SUPPORTED_QTYPES
from lora_ops.gguf_write import encode
from lora_ops.lora_runtime import LoraEntry, LoraStack, LowRankAdapter, activate, install_hooks, layer_loras
from lora_ops.qlinear import (
    DEQUANT,
    GEMV,
    GEMV_COLUMNS,
    GGUF_LAYOUT,
    Q8_0_SPLIT,
    RESIDENT,
    build_resident,
    dequantize_weight,
    fold_,
    folds_low_rank,
    quantized_linear,
    repack,
    select_plan,
)

BLOCK_QTYPES = sorted((q for q in SUPPORTED_QTYPES if q not in (QType.F32, QType.F16, QType.BF16)), key=int)
ROWS, COLS, RANK = 40, 2 * GEMV_COLUMNS + 256, 4  # three GEMV chunks, the last one short
EPS32 = torch.finfo(torch.float32).eps


def _quantized(qtype: QType, seed: int = 0):
    """(packed bytes as the layer keeps them, layout, gguf's own dequantization as the oracle)."""
    rng = np.random.default_rng(seed)
    raw = encode(rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05, qtype, rng)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(ROWS, COLS))
    data, layout = repack(torch.from_numpy(raw.reshape(-1).view(np.uint8).copy()), qtype)
    return data, layout, reference


def _adapter(seed: int, rows=ROWS, out_slice=None, trainable=False) -> LowRankAdapter:
    g = torch.Generator().manual_seed(seed)
    down, up = torch.randn(RANK, COLS, generator=g) * 0.05, torch.randn(rows, RANK, generator=g) * 0.05
    if trainable:
        down.requires_grad_(True), up.requires_grad_(True)
    return LowRankAdapter(down=down, up=up, scale=2.0 / RANK, out_slice=out_slice)


def _pairs(*strength_adapters):
    return tuple((torch.tensor(float(s)), a) for s, a in strength_adapters)


def _separate(x, weight, pairs):
    """The reference for LoRA: F.linear on the base weight plus each s·scale·B(Ax), in float64."""
    y = F.linear(x.double(), weight.double())
    for strength, a in pairs:
        target = y if a.out_slice is None else y.narrow(-1, *a.out_slice)
        target += float(strength) * a.scale * F.linear(F.linear(x.double(), a.down.double()), a.up.double())
    return y


def _summation_bound(x, weight_abs):
    # |fl(Σ xₖwₖ) − Σ xₖwₖ| ≤ K·u·Σ|xₖwₖ| for any summation order (u = eps/2), for ours and for
    # the reference alike: two orders differ by at most 2·K·u·Σ|xₖwₖ| = K·eps·Σ|xₖwₖ|.
    return COLS * EPS32 * F.linear(x.abs().double(), weight_abs.double())


@pytest.fixture
def x_many():
    """Enough tokens that LoRAs fold into the dequantized weight (``folds_low_rank``)."""
    return torch.randn(2, 24, COLS, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def x_few():
    """Too few tokens to fold: low-rank LoRAs take the separate path beside the dequantized weight."""
    return torch.randn(2, 3, COLS, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def x_one():
    return torch.randn(1, 1, COLS, generator=torch.Generator().manual_seed(2))


def test_plan_selection():
    assert select_plan(1, resident_usable=False, has_weight_patches=False) == GEMV
    assert select_plan(4096, resident_usable=False, has_weight_patches=False) == DEQUANT
    assert select_plan(1, resident_usable=True, has_weight_patches=False) == RESIDENT
    assert select_plan(4096, resident_usable=True, has_weight_patches=True) == DEQUANT
    assert select_plan(1, resident_usable=False, has_weight_patches=False, needs_grad=True) == DEQUANT
    assert select_plan(1, resident_usable=False, has_weight_patches=False, reads_base=True) == DEQUANT
    assert folds_low_rank(48, (ROWS, COLS)) and not folds_low_rank(6, (ROWS, COLS))
    assert folds_low_rank(4096, (3072, 3072)) and not folds_low_rank(1535, (3072, 3072))


def test_q8_0_repack_is_lossless_and_keeps_the_byte_count():
    rng = np.random.default_rng(0)
    raw = encode(rng.standard_normal((ROWS, COLS)).astype(np.float32), QType.Q8_0, rng)
    data, layout = repack(torch.from_numpy(raw.reshape(-1).view(np.uint8).copy()), QType.Q8_0)
    assert layout == Q8_0_SPLIT and data.numel() == raw.nbytes and data.dtype == torch.uint8
    reference = gguf.quants.dequantize(raw, QType.Q8_0).reshape(ROWS, COLS)
    assert torch.equal(dequantize_weight(data, QType.Q8_0, (ROWS, COLS), layout, torch.float32), torch.from_numpy(reference))
    assert repack(data, QType.Q4_K)[1] == GGUF_LAYOUT  # other types keep the file's layout


@pytest.mark.parametrize("qtype", BLOCK_QTYPES, ids=lambda q: q.name)
def test_dequant_plan_is_bit_exact(qtype, x_many):
    data, layout, reference = _quantized(qtype)
    bias = torch.randn(ROWS)
    # Same weight bits, same F.linear: the same arithmetic, so the same bits.
    assert torch.equal(quantized_linear(x_many, data, qtype, (ROWS, COLS), layout, bias), F.linear(x_many, reference, bias))


@pytest.mark.parametrize("qtype", BLOCK_QTYPES, ids=lambda q: q.name)
def test_gemv_plan_matches_within_summation_error(qtype, x_one):
    data, layout, reference = _quantized(qtype)
    ours = quantized_linear(x_one, data, qtype, (ROWS, COLS), layout, None)
    exact = F.linear(x_one.double(), reference.double())
    assert ours.shape == (1, 1, ROWS)
    assert ((ours.double() - exact).abs() <= _summation_bound(x_one, reference.abs())).all()
    assert not torch.equal(ours, torch.zeros_like(ours))


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_K, QType.Q4_0], ids=lambda q: q.name)
@pytest.mark.parametrize("tokens", ["one", "many"])
def test_resident_equals_streaming(qtype, tokens, x_one, x_many):
    x = x_one if tokens == "one" else x_many
    data, layout, reference = _quantized(qtype)
    resident = build_resident(None, data, qtype, (ROWS, COLS), layout, (), torch.float32)
    assert torch.equal(resident.weight, reference)
    ours = quantized_linear(x, data, qtype, (ROWS, COLS), layout, None, resident=resident)
    assert torch.equal(ours, F.linear(x, reference))  # resident: exactly native F.linear
    if tokens == "many":
        assert torch.equal(ours, quantized_linear(x, data, qtype, (ROWS, COLS), layout, None))


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_K, QType.Q5_1], ids=lambda q: q.name)
@pytest.mark.parametrize("tokens", ["one", "few", "many"])
def test_folded_lora_equals_separate_path(qtype, tokens, x_one, x_few, x_many):
    x = {"one": x_one, "few": x_few, "many": x_many}[tokens]
    data, layout, reference = _quantized(qtype)
    whole, part = _adapter(10), _adapter(11, rows=16, out_slice=(8, 16))  # a plain and a fused-qkv slice
    pairs = _pairs((0.8, whole), (-1.5, part))
    expected = _separate(x, reference, pairs)
    w_eff_abs = reference.abs() + 0.8 * whole.dense_delta(reference).abs()
    w_eff_abs[8:24] += 1.5 * part.dense_delta(reference[8:24]).abs()
    # Folding rounds W + sΔ once more per element (relative eps/2 of |W_eff|) and sums in another
    # order: both within K·eps·Σ|x||W_eff| of the float64 truth (plus the low-rank path's own sums).
    bound = 2 * _summation_bound(x, w_eff_abs)
    for resident in (None, build_resident(None, data, qtype, (ROWS, COLS), layout, pairs, torch.float32)):
        ours = quantized_linear(x, data, qtype, (ROWS, COLS), layout, None, pairs=pairs, resident=resident)
        assert ((ours.double() - expected).abs() <= bound).all()
        assert not torch.allclose(ours, F.linear(x, reference))  # the LoRA did something
    # Which path streaming took, to the bit: folded with many tokens, separate with few.
    if tokens != "one":
        streamed = quantized_linear(x, data, qtype, (ROWS, COLS), layout, None, pairs=pairs)
        folded = F.linear(x, fold_(reference.clone(), pairs))
        separate = layer_loras(pairs, ROWS, COLS).add_to(F.linear(x, reference), x)
        assert torch.equal(streamed, folded if tokens == "many" else separate)


@pytest.mark.parametrize("tokens", ["one", "many"])
def test_lokr_and_dora_fold_as_their_dense_update_of_the_dequantized_base(tokens, x_one, x_many):
    from lora_ops.lora_runtime import DoRAAdapter, KroneckerAdapter

    x = x_one if tokens == "one" else x_many
    data, layout, reference = _quantized(QType.Q8_0)
    g = torch.Generator().manual_seed(12)
    lokr = KroneckerAdapter(torch.randn(5, 10, generator=g) * 0.1, torch.randn(8, 128, generator=g) * 0.1, scale=0.5)
    inner = _adapter(13)
    dora = DoRAAdapter(inner, reference.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.rand(ROWS, 1, generator=g)))
    # Core's DoRA on the file's weight, written out (not through dense_delta).
    merged = reference + inner.scale * inner.up @ inner.down
    dora_delta = merged * dora.magnitude / (reference.norm(dim=1, keepdim=True) + EPS32) - reference
    # DoRA reads the base as dequantized, not with the LoKr folded first.
    pairs = _pairs((0.7, lokr), (-1.2, dora))
    w_eff = reference + 0.7 * 0.5 * torch.kron(lokr.w1, lokr.w2) - 1.2 * dora_delta
    expected = F.linear(x.double(), w_eff.double())
    for resident in (None, build_resident(None, data, QType.Q8_0, (ROWS, COLS), layout, pairs, torch.float32)):
        ours = quantized_linear(x, data, QType.Q8_0, (ROWS, COLS), layout, None, pairs=pairs, resident=resident)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)
    # LoKr alone on one token stays on GEMV with its separate path: the same result.
    only_lokr = _pairs((0.7, lokr))
    ours = quantized_linear(x, data, QType.Q8_0, (ROWS, COLS), layout, None, pairs=only_lokr)
    want = F.linear(x.double(), (reference + 0.7 * 0.5 * torch.kron(lokr.w1, lokr.w2)).double())
    torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", ["one", "few", "many"])
def test_strength_zero_and_removal_are_bit_identical(tokens, x_one, x_few, x_many):
    x = {"one": x_one, "few": x_few, "many": x_many}[tokens]
    data, layout, _ = _quantized(QType.Q4_0)
    base = quantized_linear(x, data, QType.Q4_0, (ROWS, COLS), layout, None)
    zero = _pairs((0.0, _adapter(10)), (0.0, _adapter(11, rows=16, out_slice=(8, 16))))
    assert torch.equal(quantized_linear(x, data, QType.Q4_0, (ROWS, COLS), layout, None, pairs=zero), base)
    # A resident copy folded for a LoRA, rebuilt for none (removal): the base, in the same storage.
    folded = build_resident(None, data, QType.Q4_0, (ROWS, COLS), layout, _pairs((1.0, _adapter(10))), torch.float32)
    storage = folded.weight.data_ptr()
    removed = build_resident(folded, data, QType.Q4_0, (ROWS, COLS), layout, (), torch.float32)
    assert removed.weight.data_ptr() == storage
    assert torch.equal(removed.weight, dequantize_weight(data, QType.Q4_0, (ROWS, COLS), layout, torch.float32))
    assert torch.equal(quantized_linear(x, data, QType.Q4_0, (ROWS, COLS), layout, None, resident=removed),
                       F.linear(x, removed.weight))


def test_stale_resident_copy_is_not_used(x_many):
    """Eager calls check what a copy holds: a stack it was not built for streams instead."""
    data, layout, reference = _quantized(QType.Q8_0)
    resident = build_resident(None, data, QType.Q8_0, (ROWS, COLS), layout, _pairs((1.0, _adapter(3))), torch.float32)
    assert torch.equal(quantized_linear(x_many, data, QType.Q8_0, (ROWS, COLS), layout, None, resident=resident),
                       F.linear(x_many, reference))


@pytest.mark.parametrize("tokens", ["one", "many"])
def test_trainable_adapters_get_gradients_from_the_separate_path(tokens, x_one, x_many):
    x = (x_one if tokens == "one" else x_many).clone().requires_grad_(True)
    data, layout, reference = _quantized(QType.Q8_0)
    frozen, trained = _adapter(5), _adapter(6, trainable=True)
    pairs = _pairs((0.7, frozen), (1.3, trained))
    ours = quantized_linear(x, data, QType.Q8_0, (ROWS, COLS), layout, None, pairs=pairs)
    ours.square().sum().backward()
    grads = [t.grad.clone() for t in (trained.down, trained.up, x)]
    for t in (trained.down, trained.up, x):
        t.grad = None
    expected = _separate(x, reference, pairs).float()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    expected.square().sum().backward()
    for got, want in zip(grads, (trained.down.grad, trained.up.grad, x.grad)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_core_weight_patches_run_on_the_dequantized_weight(x_one):
    data, layout, reference = _quantized(QType.Q8_0)
    ours = quantized_linear(x_one, data, QType.Q8_0, (ROWS, COLS), layout, None, weight_patches=[lambda w: w * 2])
    assert torch.equal(ours, F.linear(x_one, reference * 2))  # not GEMV: the patch needs the weight


class _QuantizedLayer(torch.nn.Module):
    """As the pack's quantized Linear: its forward reads its own LayerLoras attribute, nothing else."""

    def __init__(self, data, layout):
        super().__init__()
        self.data, self.layout = data, layout
        self.in_features, self.out_features = COLS, ROWS

    def forward(self, x):
        from lora_ops.lora_runtime import active_loras

        return quantized_linear(x, self.data, QType.Q8_0, (ROWS, COLS), self.layout, None, pairs=active_loras(self))


class _ThreeLayers(torch.nn.Module):
    """A modulation-like one-token layer (GEMV), a few-token one (separate path) and a many-token
    one (folded) on the same quantized weight."""

    def __init__(self, data, layout):
        super().__init__()
        self.mod, self.txt, self.img = (_QuantizedLayer(data, layout) for _ in range(3))

    def forward(self, vec, few, many):
        return self.mod(vec), self.txt(few), self.img(many)


def _kinds(seed):
    """A LoRA, a LoHa (low-rank of rank r1·r2) and a LoKr on the three layers."""
    from lora_ops.lora_runtime import KroneckerAdapter, hadamard_as_low_rank

    g = torch.Generator().manual_seed(seed)
    down, up = hadamard_as_low_rank(*(0.1 * torch.randn(*s, generator=g) for s in ((ROWS, 2), (2, COLS), (ROWS, 3), (3, COLS))))
    lokr = KroneckerAdapter(0.1 * torch.randn(5, 10, generator=g), 0.1 * torch.randn(8, 128, generator=g), scale=0.5)
    return {"lora": _adapter(seed, rows=16, out_slice=(8, 16)), "loha": LowRankAdapter(down, up, 0.5), "lokr": lokr}


def _on_all(adapter):
    return {"mod": (adapter,), "txt": (adapter,), "img": (adapter,)}


def test_compiles_as_one_graph_and_what_users_change_does_not_recompile(x_one, x_few, x_many):
    """torch.compile (inductor, fullgraph): every plan with LoRAs traces as one graph, and what a
    user changes between prompts on the same layers (a strength, a second low-rank LoRA of another
    rank, a removal, a re-application, strength 0) is new values, not a recompile."""
    import torch._dynamo

    data, layout, _ = _quantized(QType.Q8_0)
    model = _ThreeLayers(data, layout)
    install_hooks(model, ["mod", "txt", "img"])
    a, b = _on_all(_adapter(1)), _on_all(_kinds(2)["loha"])  # ranks 4 and 6
    stacks = {
        "one LoRA": LoraStack([LoraEntry("a", 1.0, a)]),
        "strength": LoraStack([LoraEntry("a", 0.25, a)]),
        "second of another rank": LoraStack([LoraEntry("a", 0.25, a), LoraEntry("b", -0.5, b)]),
        "first removed": LoraStack([LoraEntry("b", -0.5, b)]),
        "re-applied": LoraStack([LoraEntry("a", 1.0, _on_all(_adapter(1)))]),
        "strength 0": LoraStack([LoraEntry("a", 0.0, a)]),
        "all removed": LoraStack(),
    }
    inputs = (x_one, x_few, x_many)
    with torch.no_grad():
        with activate(None):
            base = model(*inputs)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        for change, stack in stacks.items():
            # The first stack compiles; every later change must not.
            with torch._dynamo.config.patch(error_on_recompile=change != "one LoRA"), activate(stack):
                eager, ours = model(*inputs), compiled(*inputs)
            for got, want in zip(ours, eager):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=change)
            if change in ("strength 0", "all removed"):  # the base, bit for bit, under compile too
                assert all(torch.equal(o, b) for o, b in zip(ours, base)), change
            else:
                assert not torch.allclose(ours[2], base[2]), change


def test_three_loras_of_mixed_kinds_compile_as_one_graph(x_one, x_few, x_many):
    """LoRA + LoHa + LoKr on every plan: one graph (fullgraph), equal to eager; a LoKr is its own
    term of the graph (a structural change), its strength a value."""
    import torch._dynamo

    data, layout, _ = _quantized(QType.Q8_0)
    model = _ThreeLayers(data, layout)
    install_hooks(model, ["mod", "txt", "img"])
    kinds = _kinds(3)
    entries = [LoraEntry(name, 0.7, _on_all(adapter)) for name, adapter in kinds.items()]
    inputs = (x_one, x_few, x_many)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():
        for strength in (0.7, -1.3):  # the second strength must not recompile
            stack = LoraStack([dataclasses.replace(e, strength=strength) for e in entries])
            with torch._dynamo.config.patch(error_on_recompile=strength != 0.7), activate(stack):
                eager, ours = model(*inputs), compiled(*inputs)
            for got, want in zip(ours, eager):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
