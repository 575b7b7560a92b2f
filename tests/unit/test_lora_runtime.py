import copy

import pytest
import torch
from torch import nn

from lora_ops.lora_runtime import LoraEntry, LoraStack, LowRankAdapter, activate, install_hooks

IN, OUT, RANK = 16, 12, 4


class _Block(nn.Module):
    """A stand-in for a FLUX block: a fused qkv and a subclassed Linear (like ComfyUI's ops)."""

    class _OpsLinear(nn.Linear):
        pass

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(IN, 3 * OUT)
        self.proj = self._OpsLinear(IN, OUT)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block()])


def _adapter(seed: int, in_f=IN, out_f=OUT, rank=RANK, alpha=2.0, out_slice=None) -> LowRankAdapter:
    g = torch.Generator().manual_seed(seed)
    return LowRankAdapter(
        down=torch.randn(rank, in_f, generator=g),
        up=torch.randn(out_f, rank, generator=g),
        scale=alpha / rank,
        out_slice=out_slice,
    )


def _entry(name, strength, path="blocks.0.proj", adapter=None) -> LoraEntry:
    return LoraEntry(name, strength, {path: (adapter or _adapter(ord(name[0])),)})


def _delta(adapter: LowRankAdapter, x: torch.Tensor) -> torch.Tensor:
    return x @ (adapter.up @ adapter.down).T * adapter.scale


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = _Model()
    install_hooks(m, ["blocks.0.proj", "blocks.0.qkv"])
    return m


@pytest.fixture
def x():
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1))


def test_hooked_output_matches_low_rank_math(model, x):
    proj = model.blocks[0].proj
    entry = _entry("a", 0.7)
    adapter = entry.adapters["blocks.0.proj"][0]
    expected = x @ proj.weight.T + proj.bias + 0.7 * _delta(adapter, x)
    with activate(LoraStack([entry])):
        got = proj(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_active_stack_zero_strength_and_removal_are_bit_identical(model, x):
    proj = model.blocks[0].proj
    plain = proj(x)
    stack = LoraStack([_entry("a", 1.0)])
    with activate(stack.with_strength("a", 0.0)):
        assert torch.equal(proj(x), plain)
    with activate(stack.without("a")):
        assert torch.equal(proj(x), plain)
    with activate(stack.without("all")):
        assert torch.equal(proj(x), plain)
    with activate(None):
        assert torch.equal(proj(x), plain)
    with activate(stack):
        assert not torch.equal(proj(x), plain)
    assert torch.equal(proj(x), plain)  # leaving the block deactivates


def test_stacked_loras_add_up(model, x):
    proj = model.blocks[0].proj
    a, b = _entry("a", 0.5), _entry("b", -1.5)
    plain = proj(x)
    with activate(LoraStack([a])):
        delta_a = proj(x) - plain
    with activate(LoraStack([b])):
        delta_b = proj(x) - plain
    with activate(LoraStack([a, b])):
        both = proj(x)
    torch.testing.assert_close(both, plain + delta_a + delta_b, rtol=1e-5, atol=1e-5)


def test_out_slice_only_changes_its_rows_of_a_fused_qkv(model, x):
    qkv = model.blocks[0].qkv
    k_adapter = _adapter(7, out_slice=(OUT, OUT))  # the "k" third
    plain = qkv(x)
    with activate(LoraStack([_entry("k", 1.0, "blocks.0.qkv", k_adapter)])):
        got = qkv(x)
    expected = plain.clone()
    expected[..., OUT : 2 * OUT] += _delta(k_adapter, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[..., :OUT], plain[..., :OUT])
    assert torch.equal(got[..., 2 * OUT :], plain[..., 2 * OUT :])


def test_computes_in_input_dtype_and_casts_once_per_stack(model, x):
    from lora_ops.lora_runtime import active_loras

    model.to(torch.bfloat16)
    entry = _entry("a", 1.0)
    stack = LoraStack([entry])
    proj = model.blocks[0].proj
    with torch.no_grad(), activate(stack, x.device, torch.bfloat16):
        y = proj(x.bfloat16())
        loras = active_loras(proj)
        assert y.dtype == torch.bfloat16 and loras.down_c.dtype == torch.bfloat16
    with activate(stack, x.device, torch.bfloat16):
        assert active_loras(proj) is loras  # made once per stack, device and dtype, not per call
    # A strength change keeps the factors (only the coefficients are new).
    with activate(stack.with_strength("a", 0.5), x.device, torch.bfloat16):
        assert active_loras(proj).down_c is loras.down_c and active_loras(proj).coef is not loras.coef
    assert active_loras(proj) is None  # leaving the block deactivates
    assert entry.adapters["blocks.0.proj"][0].down.dtype == torch.float32  # the master stays fp32


def test_gradients_reach_adapters_not_frozen_weight(model, x):
    proj = model.blocks[0].proj
    proj.requires_grad_(False)
    down = nn.Parameter(torch.randn(RANK, IN) * 0.1)
    up = nn.Parameter(torch.randn(OUT, RANK) * 0.1)
    adapter = LowRankAdapter(down, up, scale=1.0, out_slice=None)
    assert adapter.down is down  # fp32 Parameters are kept, not copied
    with activate(LoraStack([LoraEntry("train", 1.0, {"blocks.0.proj": (adapter,)})])):
        proj(x).square().mean().backward()
    assert down.grad is not None and down.grad.abs().sum() > 0
    assert up.grad is not None and up.grad.abs().sum() > 0
    assert proj.weight.grad is None


def test_frozen_lora_loaded_in_inference_mode_works_with_autograd(model, x):
    with torch.inference_mode():
        adapter = _adapter(3)
        with activate(LoraStack([_entry("a", 1.0, adapter=adapter)])):
            model.blocks[0].proj(x)  # fills the cast cache with inference tensors
    x_grad = x.clone().requires_grad_(True)
    with activate(LoraStack([_entry("a", 1.0, adapter=adapter)])):
        model.blocks[0].proj(x_grad).sum().backward()
    assert x_grad.grad is not None


def test_install_is_idempotent(model, x):
    proj = model.blocks[0].proj
    install_hooks(model, ["blocks.0.proj"])
    stack = LoraStack([_entry("a", 1.0)])
    with activate(stack):
        once = proj(x)
    install_hooks(model, ["blocks.0.proj"])
    assert len(proj._forward_hooks) == 1
    with activate(stack):
        assert torch.equal(proj(x), once)


def test_deepcopy_keeps_identity():
    stack = LoraStack([_entry("a", 1.0)])
    options = copy.deepcopy({"wrappers": {"stack": stack}})
    assert options["wrappers"]["stack"] is stack


def test_with_lora_replaces_same_name_in_place():
    stack = LoraStack([_entry("a", 1.0), _entry("b", 1.0)])
    replacement = _entry("a", 0.3)
    updated = stack.with_lora(replacement).with_lora(_entry("c", 1.0))
    assert updated.names() == ("a", "b", "c")
    assert updated.entries[0] is replacement
    assert stack.names() == ("a", "b")  # the original is untouched


def test_stack_bookkeeping():
    stack = LoraStack([_entry("a", 0.0), _entry("b", 1.0, path="blocks.0.qkv")])
    assert stack.module_paths() == {"blocks.0.proj", "blocks.0.qkv"}
    # Zero strength stays in (a compiled graph must not change shape with a strength), as a tensor.
    (strength, adapter), = stack.adapters_for("blocks.0.proj")
    assert strength.dim() == 0 and strength.item() == 0.0 and adapter is stack.entries[0].adapters["blocks.0.proj"][0]
    assert stack.with_strength("a", 2.0).adapters_for("blocks.0.proj")[0][0].item() == 2.0
    assert LoraStack().is_empty and stack.without("all").is_empty and not stack.is_empty
    with pytest.raises(KeyError, match="'a', 'b'"):
        stack.without("missing")
    with pytest.raises(KeyError, match="missing"):
        stack.with_strength("missing", 1.0)


def test_adapter_validates_shapes():
    assert _adapter(0).rank == RANK
    with pytest.raises(ValueError, match="do not chain"):
        LowRankAdapter(torch.zeros(4, IN), torch.zeros(OUT, 3), scale=1.0)
    with pytest.raises(ValueError, match="out_slice"):
        LowRankAdapter(torch.zeros(4, IN), torch.zeros(OUT, 4), scale=1.0, out_slice=(0, OUT + 1))


def test_hooked_layer_compiles_without_graph_breaks(model, x):
    """ComfyUI users run TorchCompileModel: the LoRA path must trace as one graph."""
    proj = model.blocks[0].proj
    stack = LoraStack([_entry("a", 0.7)])
    with torch.no_grad(), activate(stack):
        eager = proj(x)  # ComfyUI's first (eager) call fills the cast cache
        compiled = torch.compile(proj, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)


# --- LoKr, LoHa, DoRA and row transforms ------------------------------------------------------


def test_every_adapter_kind_gives_the_same_update_both_ways(model, x):
    from lora_ops.lora_runtime import DoRAAdapter, KroneckerAdapter, hadamard_as_low_rank

    g = torch.Generator().manual_seed(3)
    proj = model.blocks[0].proj  # (12, 16) = kron((3, 4), (4, 4))
    w1, w2 = torch.randn(3, 4, generator=g), torch.randn(4, 4, generator=g)
    order = torch.tensor([6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5])  # halves swapped, as swap_scale_shift
    lokr = KroneckerAdapter(w1, w2, scale=0.5, row_order=order)
    assert torch.equal(lokr.dense_delta(proj.weight), (0.5 * torch.kron(w1, w2))[order])

    w1a, w1b, w2a, w2b = (torch.randn(*s, generator=g) for s in ((12, 2), (2, 16), (12, 3), (3, 16)))
    down, up = hadamard_as_low_rank(w1a, w1b, w2a, w2b)
    loha = LowRankAdapter(down, up, scale=0.25, row_order=order)
    assert down.shape == (6, 16)
    torch.testing.assert_close(loha.dense_delta(proj.weight), 0.25 * ((w1a @ w1b) * (w2a @ w2b))[order])

    magnitude = 1 + 0.1 * torch.randn(1, IN, generator=g)
    dora = DoRAAdapter(_adapter(5), magnitude)
    merged = proj.weight + _adapter(5).dense_delta(proj.weight)
    expected = merged * magnitude / (merged.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps) - proj.weight
    torch.testing.assert_close(dora.dense_delta(proj.weight), expected)

    for adapter in (lokr, loha, dora):
        with activate(LoraStack([LoraEntry("k", -0.7, {"blocks.0.proj": (adapter,)})])):
            got = proj(x)
        want = x @ (proj.weight + -0.7 * adapter.dense_delta(proj.weight.detach())).T + proj.bias
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dora_on_output_rows_takes_the_norm_of_the_base_weight_as_core_does():
    from lora_ops.lora_runtime import DoRAAdapter

    g = torch.Generator().manual_seed(4)
    base = torch.randn(OUT, IN, generator=g)
    magnitude = base.norm(dim=1, keepdim=True)  # m = |W|: the update is exactly the low-rank one
    inner = _adapter(6)
    torch.testing.assert_close(DoRAAdapter(inner, magnitude).dense_delta(base), inner.dense_delta(base))
    assert DoRAAdapter(inner, magnitude).dense_delta(base.double()).dtype == torch.float64


def test_lora_dropout_drops_the_low_rank_input_only_while_training():
    gen = torch.Generator().manual_seed(0)
    down = torch.nn.Parameter(torch.randn(4, 16, generator=gen))
    up = torch.nn.Parameter(torch.randn(8, 4, generator=gen))
    x = torch.randn(3, 16, generator=gen)
    strength = torch.tensor(1.0)
    adapter = LowRankAdapter(down, up, 0.5, dropout=0.25)
    plain = LowRankAdapter(down, up, 0.5)

    torch.manual_seed(11)
    dropped = adapter.output(x, strength)
    torch.manual_seed(11)  # PEFT's order: dropout on the input, then down, then up
    expected = torch.nn.functional.linear(torch.nn.functional.linear(
        torch.nn.functional.dropout(x, 0.25, training=True), down), up) * 0.5
    torch.testing.assert_close(dropped, expected)
    assert not torch.allclose(dropped, plain.output(x, strength))
    with torch.no_grad():  # sampling: never dropped
        torch.testing.assert_close(adapter.output(x, strength), plain.output(x, strength))
    frozen = LowRankAdapter(down.detach(), up.detach(), 0.5, dropout=0.25)  # a loaded LoRA: never dropped
    torch.testing.assert_close(frozen.output(x, strength), plain.output(x, strength).detach())
    with pytest.raises(ValueError, match="dropout"):
        LowRankAdapter(down, up, 0.5, dropout=1.0)


def test_activate_with_a_root_sets_only_that_models_layers(model, x):
    """Two loaded models share layer paths and may differ in shape (FLUX.1 beside FLUX.2): a stack
    built for one is activated on the model being run only (without `root`, building it for the
    other model's layer fails on the shapes)."""
    other = nn.Module()
    other.blocks = nn.ModuleList([nn.Module()])
    other.blocks[0].proj = nn.Linear(2 * IN, 2 * OUT)  # same path, other shape
    install_hooks(other, ["blocks.0.proj"])
    entry = _entry("a", 1.0)
    stack = LoraStack([entry])
    with torch.no_grad():
        plain = model.blocks[0].proj(x)
        with activate(stack, root=model):
            adapted = model.blocks[0].proj(x)
            assert other.blocks[0].proj.__dict__.get("fluxq_loras") is None
    adapter = entry.adapters["blocks.0.proj"][0]
    torch.testing.assert_close(adapted - plain, _delta(adapter, x), rtol=1e-4, atol=1e-5)
