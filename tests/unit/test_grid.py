import numpy as np
import pytest
import torch

from lora_ops import grid


@pytest.mark.parametrize(("text", "expected"), [
    ("0, 0.5, 1.0", [0.0, 0.5, 1.0]),
    ("  -1 0.25;2 ", [-1.0, 0.25, 2.0]),
    ("1e-1,\n.8", [0.1, 0.8]),
    ("-10, 10", [-10.0, 10.0]),
])
def test_parse_strengths(text, expected):
    assert grid.parse_strengths(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "strengths is empty"),
    (" , ;", "strengths is empty"),
    ("0, 0..5", r"item 2 \('0..5'\) is not a number"),
    ("1, inf", "item 2 .* must be a finite number"),
    ("0.5, 0.50", "lists 0.5 twice"),
    # a decimal comma would otherwise become two rows, 0 and 75
    ("0,75", r"'0,75' is ambiguous .* Write '0.75' for one strength or '0, 75' for 2 strengths"),
    ("0, 0.5,1", r"'0.5,1' is ambiguous .* Write '0.5, 1' for 2 strengths"),
    ("1e3", r"item 1 \('1e3'\) is outside -10..10"),
    ("0, -10.5", r"item 2 \('-10.5'\) is outside -10..10"),
])
def test_parse_strengths_errors(text, message):
    with pytest.raises(grid.GridInputError, match=message):
        grid.parse_strengths(text)


def test_parse_seeds():
    assert grid.parse_seeds("0, 1 42") == [0, 1, 42]
    assert grid.parse_seeds(str(2**64 - 1)) == [2**64 - 1]
    for text, message in (("", "seeds is empty"), ("1, -3", r"item 2 \('-3'\) is not a whole number"),
                          ("1.5", "not a whole number"), (str(2**64), "larger than 2\\^64-1"), ("7 7", "lists 7 twice")):
        with pytest.raises(grid.GridInputError, match=message):
            grid.parse_seeds(text)


def test_plan_rows_and_baseline():
    plan = grid.plan_grid("0, 0.5, 1", "3, 4", "a.safetensors")
    assert plan.row_labels() == ["strength 0", "strength 0.5", "strength 1"]
    assert plan.column_labels() == ["seed 3", "seed 4"]
    assert plan.rows[0].is_baseline and plan.rows[1].lora == "a.safetensors"
    assert plan.cell_count == 6
    assert [plan.baseline_cell(i) for i in range(6)] == [0, 1, 0, 1, 0, 1]


def test_plan_lora_vs_lora_and_difference_adds_a_baseline():
    plan = grid.plan_grid("1, 0.5", "0", "a", "b", with_baseline=True)
    assert plan.row_labels() == ["no LoRA", "A @ 1", "B @ 1", "A @ 0.5", "B @ 0.5"]
    assert [row.lora for row in plan.rows] == [None, "a", "b", "a", "b"]
    # strength 0 already is the baseline: no second one
    assert grid.plan_grid("0.5, 0", "0", "a", with_baseline=True).row_labels() == ["strength 0.5", "strength 0"]
    assert grid.plan_grid("0.5, 0", "0", "a", with_baseline=True).baseline_cell(0) == 1


def test_plan_block_weight_rows():
    rows = "double only\nlate: second half\nd0-9=1, s*=0"
    plan = grid.plan_grid("0, 1", "0, 1", "a", block_rows_text=rows)
    assert plan.row_labels() == ["strength 0", "double only @ 1", "late @ 1", "d0-9=1, s*=0 @ 1"]
    assert plan.rows[0].blocks is None and plan.rows[2].blocks.spec.text == "second half"
    assert plan.rows[3].blocks.spec.resolve(19, 38).single == (0.0,) * 38
    ab = grid.plan_grid("0.5", "0", "a", "b", block_rows_text="none\nall")
    assert ab.row_labels() == ["A · none @ 0.5", "B · none @ 0.5", "A · all @ 0.5", "B · all @ 0.5"]
    assert grid.plan_grid("1", "0", "a", block_rows_text=" \n").row_labels() == ["strength 1"]
    with pytest.raises(grid.GridInputError, match="line 2: block weights: item 1 \\('x1=0'\\): unknown block"):
        grid.plan_grid("1", "0", "a", block_rows_text="all\nx1=0")
    with pytest.raises(grid.GridInputError, match="65 cells, over the limit of 64; use fewer strengths, seeds or block"):
        grid.plan_grid("1", "0, 1, 2, 3, 4", "a", block_rows_text="\n".join(f"d0={i / 100}" for i in range(13)))


def test_plan_limits():
    grid.plan_grid(", ".join(str(i / 4) for i in range(1, 33)), "0, 1", "a")  # 64 cells: fine
    with pytest.raises(grid.GridInputError, match="65 cells, over the limit of 64"):
        grid.plan_grid(", ".join(str(i / 2) for i in range(1, 14)), "0, 1, 2, 3, 4", "a")
    with pytest.raises(grid.GridInputError, match="same LoRA"):
        grid.plan_grid("1", "0", "a", "a")


def test_difference_images():
    cells = torch.zeros(2, 4, 4, 3)
    cells[1, 0, 0] = 0.5
    diff, means, gain = grid.difference_images(cells, torch.zeros_like(cells))
    assert means == [0.0, pytest.approx(1.5 / 48)]
    assert gain == 2.0 and diff.max() == 1.0 and diff[0].max() == 0.0


def _cells(n, size, h=None):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(h or size, size, 3, generator=g) for _ in range(n)]


@pytest.mark.parametrize("tile", [256, 1024])
def test_draw_grid_keeps_tiles_and_scales_text(tile):
    cells = _cells(4, tile)
    out = grid.draw_grid(cells, 2, 2, ["strength 0", "strength 1"], ["seed 0", "seed 1"], ["LoRA: x", "steps 4"])
    _, height, width, channels = out.shape
    assert channels == 3 and width > 2 * tile and height > 2 * tile
    assert width < 2 * tile * 1.5 and height < 2 * tile * 1.6  # labels take a modest margin
    pixels = (out[0].numpy() * 255).round().astype(np.uint8)
    # the first tile is pasted unscaled: find it by its exact top-left row of pixels
    expected = (cells[0].numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    found = np.argwhere((pixels[:, :, 0] == expected[0, 0, 0]) & (pixels[:, :, 1] == expected[0, 0, 1]))
    assert any(np.array_equal(pixels[y:y + tile, x:x + tile], expected) for y, x in found)


def test_draw_grid_text_is_drawn_and_captions_shown():
    cells = [torch.zeros(256, 256, 3)] * 2
    plain = grid.draw_grid(cells, 1, 2, ["r"], ["a", "b"], ["h"])
    captioned = grid.draw_grid(cells, 1, 2, ["r"], ["a", "b"], ["h"], captions=[None, "mean diff 0.1000"])
    assert plain.shape == captioned.shape and not torch.equal(plain, captioned)
    header_band = plain[0, :20]
    assert header_band.max() > 0.8  # light text on the dark background


def test_draw_grid_stays_under_pillows_limits():
    cells = [torch.zeros(8, 2048, 3)] * 64
    out = grid.draw_grid(cells, 1, 64, ["r"], [f"seed {i}" for i in range(64)], ["h"])
    assert out.shape[2] <= grid.MAX_GRID_SIDE
    big = [torch.zeros(1024, 1024, 3)] * 2
    out = grid.draw_grid(big, 1, 2, ["r"], ["a", "b"], ["h"], max_pixels=1_000_000)
    assert out.shape[1] * out.shape[2] <= 1_000_000


def test_draw_grid_rejects_a_wrong_cell_count():
    with pytest.raises(ValueError, match="3 cells do not fill a 2 x 2 grid"):
        grid.draw_grid(_cells(3, 16), 2, 2, ["a", "b"], ["c", "d"], ["h"])


def test_labels_tell_near_equal_strengths_and_large_seeds_apart():
    plan = grid.plan_grid("0.1234561, 0.1234562, 1, -0.25", "9007199254740993", "a")
    assert plan.row_labels() == ["strength 0.1234561", "strength 0.1234562", "strength 1", "strength -0.25"]
    assert plan.column_labels() == ["seed 9007199254740993"]
    assert [float(label.split()[1]) for label in plan.row_labels()] == [0.1234561, 0.1234562, 1.0, -0.25]
    with pytest.raises(grid.GridInputError, match="lists 9007199254740993 twice"):  # was 9.0072e+15
        grid.parse_seeds("9007199254740993, 9007199254740993")
    with pytest.raises(grid.GridInputError, match="lists 0.1234561 twice"):
        grid.parse_strengths("0.1234561 0.12345610")
