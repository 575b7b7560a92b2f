"""The A/B compare grid without ComfyUI: parsing the strength/seed lists, planning the cells,
drawing the labelled grid with Pillow, and the difference view."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .block_weights import BlockRow, BlockWeightsError, parse_block_rows
from .errors import user_facing
from .lora_runtime import MAX_STRENGTH

MAX_CELLS = 64
MAX_SEED = 0xFFFFFFFFFFFFFFFF
# Pillow warns when opening images above MAX_IMAGE_PIXELS and refuses twice that; staying under
# it keeps the saved grid PNG openable anywhere. Sides are capped by PNG/Pillow at 65,535 px.
MAX_GRID_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MAX_GRID_SIDE = 65_000


@user_facing
class GridInputError(ValueError):
    """A strengths/seeds list or a grid size the node cannot run; raised before any sampling."""


def _split_items(text: str) -> list[str]:
    return [item for item in re.split(r"[,;\s]+", text.strip()) if item]


def parse_strengths(text: str) -> list[float]:
    """`"0, 0.5, 1.0"` -> `[0.0, 0.5, 1.0]`; commas, semicolons or spaces separate items.

    A comma between two digits (`0,75`) is refused: in many locales it is a decimal comma, and
    splitting it would silently give two rows (0 and 75)."""
    # The look-behind starts a match only at the beginning of a number: without it every position
    # inside a long digit run is tried and backtracked over (quadratic; found by the fuzz test).
    decimal_comma = re.search(r"(?<![\d.])[\d.]+(?:,\d[\d.]*)+", text)
    if decimal_comma:
        token = decimal_comma.group()
        parts = token.split(",")
        one = f"{token.replace(',', '.', 1)!r} for one strength or " if len(parts) == 2 and "." not in token else ""
        raise GridInputError(
            f"strengths: {token!r} is ambiguous (a comma between digits may be a decimal comma). "
            f"Write {one}{', '.join(parts)!r} for {len(parts)} strengths: decimals take a point, and a comma that "
            "separates strengths needs a space after it."
        )
    items = _split_items(text)
    if not items:
        raise GridInputError("strengths is empty: give at least one LoRA strength, e.g. '0, 0.5, 1.0'.")
    values = []
    for position, item in enumerate(items, 1):
        try:
            value = float(item)
        except ValueError:
            raise GridInputError(
                f"strengths: item {position} ({item!r}) is not a number; write e.g. '0, 0.5, 1.0'."
            ) from None
        if not math.isfinite(value):
            raise GridInputError(f"strengths: item {position} ({item!r}) must be a finite number.")
        if abs(value) > MAX_STRENGTH:
            raise GridInputError(
                f"strengths: item {position} ({item!r}) is outside -{MAX_STRENGTH:g}..{MAX_STRENGTH:g}, "
                "the strength range of FluxQApplyLoRA."
            )
        values.append(value)
    _reject_duplicates("strengths", values)
    return values


def parse_seeds(text: str) -> list[int]:
    """`"0, 1"` -> `[0, 1]`; seeds are whole numbers from 0 to 2^64-1, as in KSampler."""
    items = _split_items(text)
    if not items:
        raise GridInputError("seeds is empty: give at least one seed, e.g. '0, 1'.")
    values = []
    for position, item in enumerate(items, 1):
        if not re.fullmatch(r"\d+", item):
            raise GridInputError(
                f"seeds: item {position} ({item!r}) is not a whole number >= 0; write e.g. '0, 1, 42'."
            )
        # Length first: int() refuses strings of over 4,300 digits with a ValueError of its own.
        if len(item.lstrip("0")) > len(str(MAX_SEED)) or int(item) > MAX_SEED:
            raise GridInputError(f"seeds: item {position} ({item[:30]}{'...' if len(item) > 30 else ''}) is larger than 2^64-1.")
        values.append(int(item))
    _reject_duplicates("seeds", values)
    return values


def strength_label(value: float) -> str:
    """The shortest text that reads back as exactly `value` (1 -> "1", 0.1234561 -> "0.1234561"):
    two rows never share a label, as they could with a fixed number of digits."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _reject_duplicates(what: str, values: list) -> None:
    seen = set()
    for value in values:
        if value in seen:
            shown = strength_label(value) if isinstance(value, float) else str(value)
            raise GridInputError(f"{what} lists {shown} twice; each row/column must differ.")
        seen.add(value)


@dataclass(frozen=True)
class GridRow:
    """One row of the grid: `lora` at `strength` (with the row's block weights, when the grid has
    block-weight rows), or the baseline without the compared LoRAs."""

    lora: str | None
    strength: float
    label: str
    blocks: BlockRow | None = None

    @property
    def is_baseline(self) -> bool:
        return self.lora is None


@dataclass(frozen=True)
class GridPlan:
    rows: tuple[GridRow, ...]
    seeds: tuple[int, ...]

    @property
    def cell_count(self) -> int:
        return len(self.rows) * len(self.seeds)

    def column_labels(self) -> list[str]:
        return [f"seed {seed}" for seed in self.seeds]

    def row_labels(self) -> list[str]:
        return [row.label for row in self.rows]

    def baseline_cell(self, index: int) -> int:
        """The index of the baseline cell with the same seed as cell `index` (row-major)."""
        baseline_row = next(r for r, row in enumerate(self.rows) if row.is_baseline)
        return baseline_row * len(self.seeds) + index % len(self.seeds)


def parse_grid_block_rows(text: str) -> list[BlockRow]:
    """The grid's block-weight rows (`block_weights.parse_block_rows`), refused as a GridInputError."""
    try:
        return parse_block_rows(text)
    except BlockWeightsError as error:
        raise GridInputError(str(error)) from None


def plan_grid(strengths_text: str, seeds_text: str, lora_a: str, lora_b: str | None = None,
              with_baseline: bool = False, max_cells: int = MAX_CELLS, block_rows_text: str = "") -> GridPlan:
    """Rows are strengths (for LoRA-vs-LoRA, A and B next to each other per strength), columns seeds.

    Strength 0 becomes one baseline row: the model without the compared LoRA(s), which is exactly what
    strength 0 means and lets the cell equal a plain render bit for bit. `with_baseline` (the
    difference view) adds that row first if the strengths do not include 0. With block-weight rows
    (one per line of `block_rows_text`), each nonzero strength gets one row per line.
    """
    strengths = parse_strengths(strengths_text)
    seeds = parse_seeds(seeds_text)
    block_rows = parse_grid_block_rows(block_rows_text) or [None]
    loras = [lora_a] if lora_b is None else [lora_a, lora_b]
    if lora_b == lora_a:
        raise GridInputError(f"lora_name_b is the same LoRA as lora_name ({lora_a}); pick another or 'none'.")

    baseline = GridRow(None, 0.0, "no LoRA" if lora_b else "strength 0")
    rows: list[GridRow] = []
    if with_baseline and 0.0 not in strengths:
        rows.append(baseline)
    for strength in strengths:
        if strength == 0.0:
            rows.append(baseline)
            continue
        for blocks in block_rows:
            for tag, lora in zip("AB", loras):
                shown = strength_label(strength)
                if blocks is None:
                    label = f"strength {shown}" if lora_b is None else f"{tag} @ {shown}"
                else:
                    label = f"{blocks.label} @ {shown}" if lora_b is None else f"{tag} · {blocks.label} @ {shown}"
                rows.append(GridRow(lora, strength, label, blocks))

    plan = GridPlan(tuple(rows), tuple(seeds))
    if plan.cell_count > max_cells:
        raise GridInputError(
            f"the grid has {len(rows)} rows x {len(seeds)} seeds = {plan.cell_count} cells, over the limit "
            f"of {max_cells}; use fewer strengths, seeds or block-weight rows (or split it into several grids)."
        )
    return plan


def difference_images(cells: torch.Tensor, baselines: torch.Tensor) -> tuple[torch.Tensor, list[float], float]:
    """Per-cell |cell - baseline| (images N x H x W x 3 in 0..1), each cell's mean difference, and the
    brightness gain that maps the largest difference in the batch to white (raw differences are
    mostly near-black)."""
    diff = (cells.float() - baselines.float()).abs()
    means = [float(d.mean()) for d in diff]
    peak = float(diff.max()) if diff.numel() else 0.0
    gain = 1.0 / peak if peak > 0 else 1.0
    return (diff * gain).clamp(0, 1), means, gain


# ---- drawing ---------------------------------------------------------------------------------

_BACKGROUND = (24, 24, 24)
_HEADER_TEXT = (235, 235, 235)
_LABEL_TEXT = (210, 210, 210)
_CAPTION_BOX = (0, 0, 0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's bundled font scales when Pillow has FreeType (>= 10.1); else a fixed bitmap font.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = np.clip(image.detach().float().cpu().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


@dataclass(frozen=True)
class _Layout:
    tile_w: int
    tile_h: int
    font_size: int
    gap: int
    label_w: int
    header_h: int
    col_label_h: int
    width: int
    height: int


def _layout(tile_w: int, tile_h: int, rows: int, cols: int, row_labels, col_labels, header_lines,
            measure) -> _Layout:
    # Text scales with the tile so a 256 px and a 1024 px grid read the same when fitted to a screen.
    font_size = max(14, round(min(tile_w, tile_h) * 0.05))
    gap = max(2, font_size // 3)
    pad = font_size // 2
    line_h = measure("Ag", font_size)[1] + pad
    label_w = max(measure(label, font_size)[0] for label in row_labels) + 2 * pad
    col_label_h = line_h + pad
    header_h = len(header_lines) * (line_h + pad // 2) + pad
    grid_w = label_w + cols * (tile_w + gap)
    header_w = max(measure(line, font_size)[0] for line in header_lines) + 2 * pad
    width = max(grid_w, header_w)
    height = header_h + col_label_h + rows * (tile_h + gap)
    return _Layout(tile_w, tile_h, font_size, gap, label_w, header_h, col_label_h, width, height)


def draw_grid(cells: list[torch.Tensor], rows: int, cols: int, row_labels: list[str], col_labels: list[str],
              header_lines: list[str], captions: list[str] | None = None,
              max_pixels: int = MAX_GRID_PIXELS) -> torch.Tensor:
    """Lays `cells` (row-major, each H x W x 3 in 0..1) out as a labelled grid, 1 x H' x W' x 3.

    Tiles are shrunk (never the text) until the whole image fits `max_pixels` and the side limit.
    """
    if len(cells) != rows * cols:
        raise ValueError(f"{len(cells)} cells do not fill a {rows} x {cols} grid")
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fonts: dict[int, object] = {}

    def font(size):
        return fonts.setdefault(size, _font(size))

    def measure(text, size):
        return _text_size(scratch, text, font(size))

    cell_h, cell_w = cells[0].shape[0], cells[0].shape[1]
    scale = 1.0
    while True:
        tile_w, tile_h = max(16, int(cell_w * scale)), max(16, int(cell_h * scale))
        layout = _layout(tile_w, tile_h, rows, cols, row_labels, col_labels, header_lines, measure)
        fits = layout.width * layout.height <= max_pixels and max(layout.width, layout.height) <= MAX_GRID_SIDE
        if fits or (tile_w == 16 and tile_h == 16):
            break
        scale *= 0.9

    canvas = Image.new("RGB", (layout.width, layout.height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    f = font(layout.font_size)
    pad = layout.font_size // 2
    y = pad
    for line in header_lines:
        draw.text((pad, y), line, fill=_HEADER_TEXT, font=f)
        y += measure("Ag", layout.font_size)[1] + pad + pad // 2

    grid_top = layout.header_h + layout.col_label_h
    for c, label in enumerate(col_labels):
        x = layout.label_w + c * (layout.tile_w + layout.gap)
        text_w, text_h = measure(label, layout.font_size)
        draw.text((x + (layout.tile_w - text_w) // 2, layout.header_h + pad // 2), label, fill=_LABEL_TEXT, font=f)
    for r, label in enumerate(row_labels):
        y = grid_top + r * (layout.tile_h + layout.gap)
        text_w, text_h = measure(label, layout.font_size)
        draw.text((pad, y + (layout.tile_h - text_h) // 2), label, fill=_LABEL_TEXT, font=f)

    for index, cell in enumerate(cells):
        r, c = divmod(index, cols)
        x = layout.label_w + c * (layout.tile_w + layout.gap)
        y = grid_top + r * (layout.tile_h + layout.gap)
        tile = _to_pil(cell)
        if tile.size != (layout.tile_w, layout.tile_h):
            tile = tile.resize((layout.tile_w, layout.tile_h), Image.LANCZOS)
        canvas.paste(tile, (x, y))
        if captions and captions[index]:
            text_w, text_h = measure(captions[index], layout.font_size)
            box_y = y + layout.tile_h - text_h - 2 * pad
            draw.rectangle((x, box_y, x + text_w + 2 * pad, y + layout.tile_h), fill=_CAPTION_BOX)
            draw.text((x + pad, box_y + pad // 2), captions[index], fill=_HEADER_TEXT, font=f)

    array = np.asarray(canvas, dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)
