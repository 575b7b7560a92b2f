"""Per-block LoRA strengths: the syntax, its errors, and how the weights reach the runtime stack."""

import pytest
import torch
from torch import nn

from lora_ops.block_weights import (
    PRESET_NAMES,
    BlockWeights,
    BlockWeightsError,
    parse_block_rows,
    parse_block_weights,
)
from lora_ops.flux_family import BY_ID
from lora_ops.lora_runtime import (
    LoraEntry,
    LoraStack,
    LowRankAdapter,
    activate,
    install_hooks,
)

FLUX1 = (19, 38)
FLUX2_DEV = (BY_ID["flux2-dev"].double_blocks, BY_ID["flux2-dev"].single_blocks)


def weights(text, counts=FLUX1, model="FLUX.1 [dev]"):
    return parse_block_weights(text).resolve(*counts, model)


def expect(text, *fragments, counts=FLUX1, model="FLUX.1 [dev]"):
    with pytest.raises(BlockWeightsError) as error:
        weights(text, counts, model)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("counts", [FLUX1, FLUX2_DEV, (5, 20), (1, 1)])
def test_presets_follow_the_model_block_counts(counts):
    double, single = counts
    assert weights("", counts) == weights("all", counts) == BlockWeights((1.0,) * double, (1.0,) * single)
    assert weights("none", counts) == BlockWeights((0.0,) * double, (0.0,) * single)
    assert weights("double only", counts) == BlockWeights((1.0,) * double, (0.0,) * single)
    assert weights("Single_Only", counts) == weights("single-only", counts) == BlockWeights((0.0,) * double, (1.0,) * single)
    first, second = weights("first half", counts), weights("second half", counts)
    order = list(first.double + first.single)
    cut = (double + single + 1) // 2
    assert order == [1.0] * cut + [0.0] * (double + single - cut)
    assert [1.0 - w for w in order] == list(second.double + second.single)
    assert set(PRESET_NAMES) == {"all", "none", "double only", "single only", "first half", "second half"}


def test_ranges_defaults_and_later_items_win():
    w = weights("d0-9=1, s10-37=0.5")
    assert w.double == (1.0,) * 19 and w.single == (1.0,) * 10 + (0.5,) * 28
    w = weights("none; d0-9 = 1 ; d3=-0.25")
    assert w.double == (1.0,) * 3 + (-0.25,) + (1.0,) * 6 + (0.0,) * 9 and w.single == (0.0,) * 38
    w = weights("*=0.5, s* = 2, d18=0")
    assert w.double == (0.5,) * 18 + (0.0,) and w.single == (2.0,) * 38
    assert weights("d0=1,,s0=.5,") == weights("s0=0.5")  # empty items are harmless


@pytest.mark.parametrize(("text", "fragments"), [
    ("x3=1", ("item 1 ('x3=1')", "unknown block 'x3'", "d<N> (double), s<N> (single)")),
    ("d0=1, q0-2=1", ("item 2", "unknown block 'q0'")),
    ("d0-19=1", ("'d0-19=1' names double block 19", "FLUX.1 [dev] has 19 double blocks (d0-d18)")),
    ("s38=0", ("single block 38", "has 38 single blocks (s0-s37)")),
    ("d0=0,5", ("'0,5' is ambiguous", "decimal comma", "'0.5'")),
    ("d0-9=1,5", ("'1,5' is ambiguous",)),
    ("d0", ("neither a preset (all, none, double only", "'<blocks>=<weight>'")),
    ("double", ("neither a preset",)),
    ("d=1", ("'d' needs a block number",)),
    ("=1", ("names no block",)),
    ("d9-3=1", ("runs backwards; write d3-9",)),
    ("d0=abc", ("the weight 'abc' is not a number",)),
    ("d0=", ("the weight after '=' is missing",)),
    ("d0=nan", ("is not a number",)),
    ("d0=11", ("outside -10..10",)),
    ("d0==1", ("is not '<blocks>=<weight>'",)),
    ("d0=1 s0=2", ("separated by ',' or ';'",)),
    ("d*-3=1", ("'*' already means every block",)),
    ("d" + "9" * 5000 + "=1", ("out of range for any FLUX model",)),
])
def test_bad_text_is_refused_naming_the_item(text, fragments):
    expect(text, *fragments)


def test_out_of_range_names_this_model_and_its_counts():
    assert weights("d0-7=0", FLUX2_DEV).double == (0.0,) * 8
    expect("d0-9=1", "d0-9=1", "FLUX.2 [dev] has 8 double blocks (d0-d7)", counts=FLUX2_DEV,
           model="FLUX.2 [dev]")
    expect("s0=1", "has 0 single blocks (none)", counts=(1, 0))
    expect("d1=1", "has 1 double block (d0)", counts=(1, 0))
    # the text alone is fine: queue-time checks need no model
    assert parse_block_weights("d0-9=1").text == "d0-9=1"


def test_describe_reads_back_as_the_same_weights():
    for text in ("", "none", "double only", "first half", "d0-9=1, s10-37=0.5", "*=0.5; d3=-1", "s0=0.1234567"):
        w = weights(text)
        assert weights(w.describe()) == w, (text, w.describe())
    assert weights("").describe() == "all"
    assert weights("none").describe() == "d*=0, s*=0"
    assert weights("d0-9=1, s10-37=0.5").describe() == "s10-37=0.5"


def test_layers_outside_the_blocks_keep_weight_one():
    w = weights("*=0, d3=0.5, s10=2")
    assert w.for_path("double_blocks.3.img_attn.qkv") == 0.5
    assert w.for_path("double_blocks.4.txt_mlp.0") == 0.0
    assert w.for_path("single_blocks.10.linear1") == 2.0
    for outside in ("final_layer.linear", "img_in", "double_stream_modulation_img.lin", "distilled_guidance_layer.in_proj"):
        assert w.for_path(outside) == 1.0


def test_grid_rows_take_labels_presets_and_refuse_duplicates():
    rows = parse_block_rows("all\n  style: s*=0\n\nd0-9=1,  s*=0\nlate: second half\n")
    assert [r.label for r in rows] == ["all", "style", "d0-9=1, s*=0", "late"]
    assert rows[1].spec.resolve(*FLUX1) == weights("s*=0")
    assert parse_block_rows(" \n\n") == []
    with pytest.raises(BlockWeightsError, match="lines 1 and 2 are both labelled 'none'"):
        parse_block_rows("none\nnone")
    with pytest.raises(BlockWeightsError, match="line 2: block weights: item 1 \\('q1=0'\\)"):
        parse_block_rows("all\nq1=0")
    with pytest.raises(BlockWeightsError, match="line 1: 'x:' has a label but no weights"):
        parse_block_rows("x:")
    assert len(parse_block_rows("a" * 80 + ": none")[0].label) == 40


# --- the runtime stack --------------------------------------------------------------------------


def _adapter(seed, in_f=8, out_f=6):
    g = torch.Generator().manual_seed(seed)
    return LowRankAdapter(down=torch.randn(2, in_f, generator=g), up=torch.randn(out_f, 2, generator=g), scale=0.5)


PATHS = ("double_blocks.0.img_attn.proj", "double_blocks.1.img_attn.proj", "single_blocks.0.linear2", "final_layer.linear")


def _entry(strength=0.8, block_weights=None):
    return LoraEntry("a", strength, {p: (_adapter(i),) for i, p in enumerate(PATHS)}, block_weights=block_weights)


def test_each_layer_runs_at_strength_times_its_block_weight():
    w = parse_block_weights("d0=0, d1=0.5, s*=-1").resolve(2, 1)
    stack = LoraStack([_entry(0.8, w)])
    strengths = {p: float(stack.adapters_for(p)[0][0]) for p in PATHS}
    assert strengths == pytest.approx({PATHS[0]: 0.0, PATHS[1]: 0.4, PATHS[2]: -0.8, PATHS[3]: 0.8})
    # the layer at weight 0 is idle (its output is exactly the base), the others are not
    idle = [stack.layer_loras(p, 6, 8).group_idle for p in PATHS]
    assert idle == [True, False, False, False]

    # a strength change keeps the block weights; new block weights keep the strength; both share
    # the group factors (a value change: no new tensors for the compiled graph's shapes)
    stronger = stack.with_strength("a", 2.0)
    assert float(stronger.adapters_for(PATHS[1])[0][0]) == pytest.approx(1.0)
    reweighted = stack.with_block_weights("a", parse_block_weights("all").resolve(2, 1))
    assert [float(reweighted.adapters_for(p)[0][0]) for p in PATHS] == pytest.approx([0.8] * 4)
    assert reweighted.layer_loras(PATHS[0], 6, 8).up is stack.layer_loras(PATHS[0], 6, 8).up
    assert stack.with_block_weights("a", None).entries[0].block_weights is None
    with pytest.raises(KeyError, match="no LoRA named 'b'"):
        stack.with_block_weights("b", w)


def test_block_weight_zero_is_bit_exact_and_w_scales_the_update():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = nn.ModuleList([nn.Module()])
            self.double_blocks[0].proj = nn.Linear(8, 6)

    torch.manual_seed(0)
    model = Model()
    path = "double_blocks.0.proj"
    install_hooks(model, [path])
    x = torch.randn(3, 8)
    adapter = _adapter(3)
    base = model.double_blocks[0].proj(x)

    def run(weight_text):
        w = parse_block_weights(weight_text).resolve(1, 0)
        with activate(LoraStack([LoraEntry("a", 0.7, {path: (adapter,)}, block_weights=w)]), root=model):
            return model.double_blocks[0].proj(x)

    assert torch.equal(run("d0=0"), base)
    expected = base + 0.7 * 0.25 * adapter.scale * (x @ adapter.down.T @ adapter.up.T)
    torch.testing.assert_close(run("d0=0.25"), expected)
