"""Per-block LoRA strengths: a small readable syntax, parsed into one weight per double and per
single transformer block of a given FLUX model.

Syntax (case-insensitive; items separated by ',' or ';', applied left to right, later items win):

- a preset: ``all`` (every block 1: the default), ``none`` (every block 0), ``double only``,
  ``single only``, ``first half`` / ``second half`` (the first or last half of the blocks in the
  order they run: every double block, then every single block);
- an assignment ``<blocks>=<weight>``: ``d3`` (double block 3), ``s10-37`` (single blocks 10 to 37,
  both ends included), ``d*`` / ``s*`` (every double / single block), ``*`` (every block);
  a weight is a decimal number with a point, -10 to 10.

Blocks no item names keep weight 1, so ``s*=0`` turns the single blocks off and leaves the double
ones at full strength, and ``none, d0-9=1`` keeps double blocks 0-9 only. Empty text is ``all``.

Parsing is in two steps: ``parse_block_weights`` checks the text on its own (what a node can check
when a prompt is queued), ``BlockSpec.resolve`` checks its block numbers against a model's block
counts (FLUX.1 19 + 38, FLUX.2 [dev] 8 + 48, ...; read from the loaded model, never assumed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import user_facing
from .lora_runtime import MAX_STRENGTH

MAX_WEIGHT = MAX_STRENGTH
# An index longer than this is out of range for any model (and int() refuses 4,300+ digits).
_MAX_INDEX_DIGITS = 6
KINDS = {"d": "double", "s": "single"}
# The module-path prefix of each kind's blocks (BFL names, as the runtime LoRA paths).
BLOCK_PREFIX = {"d": "double_blocks.", "s": "single_blocks."}


@user_facing
class BlockWeightsError(ValueError):
    """Block-weight text that cannot be parsed, or that names blocks the model does not have."""


@dataclass(frozen=True)
class _Assign:
    kind: str  # "d", "s" or "*" (both)
    first: int | None  # None: every block of the kind
    last: int | None
    weight: float
    text: str  # the item as written, for messages


@dataclass(frozen=True)
class _Half:
    second: bool  # the half that keeps weight 1; the other gets 0


def _presets() -> dict[str, tuple]:
    every = _Assign("*", None, None, 1.0, "all")
    return {
        "all": (every,),
        "none": (_Assign("*", None, None, 0.0, "none"),),
        "double only": (_Assign("d", None, None, 1.0, "double only"), _Assign("s", None, None, 0.0, "double only")),
        "single only": (_Assign("d", None, None, 0.0, "single only"), _Assign("s", None, None, 1.0, "single only")),
        "first half": (_Half(second=False),),
        "second half": (_Half(second=True),),
    }


PRESETS = _presets()
PRESET_NAMES = tuple(PRESETS)

# <kind><index or range or *> = <number>; spaces allowed around the parts. Every quantifier is
# bounded by a character class the next part cannot start with: no backtracking blow-up.
_ASSIGN = re.compile(r"([a-z]*)\s*(\*|\d+)?\s*(?:-\s*(\d+))?\s*=\s*([^=]*)", re.IGNORECASE | re.ASCII)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?", re.IGNORECASE | re.ASCII)
# A comma between digits right after "=" (``d0=0,5``): in many locales a decimal comma.
_DECIMAL_COMMA = re.compile(r"=\s*[+-]?[\d.]+,\d", re.ASCII)


@dataclass(frozen=True)
class BlockWeights:
    """One weight per double and per single block of one model."""

    double: tuple[float, ...]
    single: tuple[float, ...]

    @property
    def is_identity(self) -> bool:
        return all(w == 1.0 for w in self.double + self.single)

    def for_path(self, module_path: str) -> float:
        """The weight of the layer at ``module_path`` (a BFL name relative to the diffusion model):
        its block's weight inside ``double_blocks.N`` / ``single_blocks.N``, else 1 (the input and
        output layers, modulation shared by all blocks (FLUX.2), Chroma's approximator)."""
        for kind, prefix in BLOCK_PREFIX.items():
            if module_path.startswith(prefix):
                index = module_path[len(prefix):].split(".", 1)[0]
                weights = self.double if kind == "d" else self.single
                if index.isdigit() and int(index) < len(weights):
                    return weights[int(index)]
        return 1.0

    def describe(self) -> str:
        """A short text that reads back as these weights (runs of equal weights as ranges)."""
        if self.is_identity:
            return "all"
        parts = []
        for kind, weights in (("d", self.double), ("s", self.single)):
            start = 0
            for index in range(1, len(weights) + 1):
                if index == len(weights) or weights[index] != weights[start]:
                    if weights[start] != 1.0:
                        whole = start == 0 and index == len(weights)
                        span = "*" if whole else f"{start}" if index - 1 == start else f"{start}-{index - 1}"
                        parts.append(f"{kind}{span}={_number(weights[start])}")
                    start = index
        return ", ".join(parts)


def _number(value: float) -> str:
    text = repr(float(value))
    return text.removesuffix(".0")


@dataclass(frozen=True)
class BlockSpec:
    """Parsed block-weight text, not yet fitted to a model's block counts (hashable)."""

    items: tuple
    text: str

    @property
    def is_all(self) -> bool:
        return all(isinstance(i, _Assign) and i.kind == "*" and i.weight == 1.0 for i in self.items)

    def resolve(self, double_blocks: int, single_blocks: int, model: str = "this model") -> BlockWeights:
        """The weights for a model with these block counts; BlockWeightsError naming the model and
        its counts when an item names a block it does not have."""
        weights = {"d": [1.0] * double_blocks, "s": [1.0] * single_blocks}
        for item in self.items:
            if isinstance(item, _Half):
                order = [("d", i) for i in range(double_blocks)] + [("s", i) for i in range(single_blocks)]
                cut = (len(order) + 1) // 2
                for position, (kind, index) in enumerate(order):
                    weights[kind][index] = 1.0 if (position >= cut) == item.second else 0.0
                continue
            for kind in ("d", "s") if item.kind == "*" else (item.kind,):
                count = len(weights[kind])
                first, last = (0, count - 1) if item.first is None else (item.first, item.last)
                if item.first is not None and last >= count:
                    have = (f"{kind}0" if count == 1 else f"{kind}0-{kind}{count - 1}") if count else "none"
                    raise BlockWeightsError(
                        f"block weights: {item.text!r} names {KINDS[kind]} block {last}, but {model} has "
                        f"{count} {KINDS[kind]} block{'' if count == 1 else 's'} ({have}).")
                for index in range(first, last + 1):
                    weights[kind][index] = item.weight
        return BlockWeights(tuple(weights["d"]), tuple(weights["s"]))


def parse_block_weights(text: str) -> BlockSpec:
    """The block-weight text checked on its own (no model needed); see the module docstring."""
    if not isinstance(text, str):
        raise BlockWeightsError(f"block weights must be text, got {type(text).__name__}.")
    comma = _DECIMAL_COMMA.search(text)
    if comma:
        token = comma.group().lstrip("=").strip()
        raise BlockWeightsError(
            f"block weights: {token!r} is ambiguous (a comma between digits may be a decimal comma). Write "
            f"{token.replace(',', '.', 1)!r} for one weight: decimals take a point, and items are separated by "
            "', ' or ';'.")
    items = []
    for position, raw in enumerate(re.split(r"[,;]", text), 1):
        item = " ".join(raw.split())
        if item:  # an empty item ("d0=1,,s0=0", a trailing comma) is harmless
            items.extend(_parse_item(item, position))
    if not items:
        items = list(PRESETS["all"])
    return BlockSpec(tuple(items), text.strip())


def _parse_item(item: str, position: int) -> tuple:
    preset = PRESETS.get(" ".join(re.split(r"[\s_-]+", item.lower())))
    if preset is not None:
        return preset
    where = f"block weights: item {position} ({_short(item)})"
    if "=" not in item:
        raise BlockWeightsError(
            f"{where} is neither a preset ({', '.join(PRESET_NAMES)}) nor '<blocks>=<weight>', e.g. 'd0-9=1' "
            "or 's*=0.5'.")
    match = _ASSIGN.fullmatch(item)
    if match is None:
        raise BlockWeightsError(f"{where} is not '<blocks>=<weight>': write e.g. 'd0-9=1, s10-37=0.5' (items are "
                                "separated by ',' or ';').")
    letter, index, last, value = match.groups()
    letter = letter.lower()
    if letter == "" and index == "*" and last is None:
        kind = "*"
    elif letter in KINDS:
        kind = letter
    elif not letter and index is None:
        raise BlockWeightsError(f"{where} names no block before '='; write e.g. 'd0-9=1' or '*=0.5'.")
    else:
        raise BlockWeightsError(
            f"{where}: unknown block {letter + (index or '')!r}; blocks are d<N> (double), s<N> (single), a range like d0-9, "
            "d* / s* (every double / single block) or * (every block).")
    if index is None:
        raise BlockWeightsError(f"{where}: {kind!r} needs a block number, a range or '*', e.g. '{kind}0-9' or '{kind}*'.")
    first = end = None
    if index != "*":
        for number in (index, last):
            if number is not None and len(number.lstrip("0")) > _MAX_INDEX_DIGITS:
                raise BlockWeightsError(f"{where}: block number {_short(number)} is out of range for any FLUX model.")
        first = int(index)
        end = first if last is None else int(last)
        if end < first:
            raise BlockWeightsError(f"{where}: the range {first}-{end} runs backwards; write {kind}{end}-{first}.")
    elif last is not None:
        raise BlockWeightsError(f"{where}: '*' already means every block; drop the range.")
    value = value.strip()
    if not value:
        raise BlockWeightsError(f"{where}: the weight after '=' is missing; write e.g. 'd0-9=0.5'.")
    if not _NUMBER.fullmatch(value):
        raise BlockWeightsError(f"{where}: the weight {_short(value)} is not a number; write e.g. 'd0-9=0.5'.")
    weight = float(value)
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise BlockWeightsError(f"{where}: the weight {_short(value)} is outside -{MAX_WEIGHT:g}..{MAX_WEIGHT:g}.")
    return (_Assign(kind, first, end, weight, item),)


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --- grid rows ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockRow:
    label: str
    spec: BlockSpec


MAX_LABEL = 40


def parse_block_rows(text: str) -> list[BlockRow]:
    """The grid's block-weight rows: one per non-empty line, ``label: weights`` or just the weights
    (a preset name labels itself; other lines are their own label). Labels must differ."""
    rows, seen = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        label, _, body = line.partition(":") if ":" in line else ("", "", line)
        label, body = " ".join(label.split()), body.strip()
        try:
            spec = parse_block_weights(body)
        except BlockWeightsError as error:
            raise BlockWeightsError(f"block-weight rows, line {number}: {error}") from None
        if not body:
            raise BlockWeightsError(f"block-weight rows, line {number}: {_short(line)} has a label but no weights.")
        label = label or " ".join(body.split())
        if len(label) > MAX_LABEL:
            label = label[:MAX_LABEL - 3] + "..."
        if label in seen:
            raise BlockWeightsError(f"block-weight rows: lines {seen[label]} and {number} are both labelled "
                                    f"{label!r}; each row must differ (give one a 'label: ' in front).")
        seen[label] = number
        rows.append(BlockRow(label, spec))
    return rows
