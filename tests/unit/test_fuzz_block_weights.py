"""Fuzzing the block-weight syntax (FluxQApplyLoRA's block_weights, the grid's block-weight rows).
Property: weights of the model's exact block counts, every one finite and within -10..10, or
BlockWeightsError, nothing else, within the time and memory bounds; what `describe` writes parses
back to the same weights."""

from __future__ import annotations

from fuzz_support import bounded, expect_only, fuzz_settings
from hypothesis import example, given
from hypothesis import strategies as st

from lora_ops.block_weights import (
    MAX_WEIGHT,
    PRESET_NAMES,
    BlockWeightsError,
    parse_block_rows,
    parse_block_weights,
)

TOKENS = (*PRESET_NAMES, "d", "s", "D", "S", "*", "x", "0", "1", "9", "19", "37", "999999", "9" * 5000, "-", "=", "==",
          ",", ";", ", ", " ", "\t", "\n", ":", ".", "0.5", "-1", "1e3", "1e-400", "1e99999", "nan", "inf", "0,5",
          "\u0661", "\u3000", "label: ", "_", "all")

block_text = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(TOKENS), max_size=16).map("".join),
    st.lists(st.tuples(st.sampled_from(("d", "s", "*", "d*", "s*", "q")), st.integers(0, 60), st.integers(-1, 60),
                       st.floats(-12, 12, allow_nan=False).map(lambda v: f"{v:g}")), max_size=6).map(
        lambda items: ", ".join(f"{k}{a}{'' if b < 0 else f'-{b}'}={w}" for k, a, b, w in items)),
)
counts = st.tuples(st.integers(0, 60), st.integers(0, 60))


@fuzz_settings(ci_examples=300)
@given(text=block_text, counts=counts)
@example(text="d0=" + "9" * 9000 + ",1", counts=(19, 38))  # the decimal-comma search must stay linear
@example(text="=" + "1" * 9000, counts=(19, 38))
@example(text="d0-9=1, s10-37=0.5", counts=(8, 48))
def test_block_weights_parse_or_are_refused(text, counts):
    parsed = bounded(parse_block_weights, len(text) + 1, text)
    expect_only(parsed, BlockWeightsError, "block weights")
    if parsed.error is not None:
        return
    resolved = bounded(parsed.result.resolve, len(text) + 8 * sum(counts) + 1, *counts, "the model")
    expect_only(resolved, BlockWeightsError, "the model has")
    if resolved.error is not None:
        return
    weights = resolved.result
    assert (len(weights.double), len(weights.single)) == counts
    assert all(abs(w) <= MAX_WEIGHT for w in weights.double + weights.single)
    assert parse_block_weights(weights.describe()).resolve(*counts) == weights


@fuzz_settings(ci_examples=150)
@given(st.lists(block_text, max_size=6).map("\n".join))
def test_block_weight_rows_parse_or_are_refused(text):
    outcome = bounded(parse_block_rows, len(text) + 1, text)
    expect_only(outcome, BlockWeightsError, "block")
    if outcome.error is None:
        labels = [row.label for row in outcome.result]
        assert len(set(labels)) == len(labels) and all(0 < len(label) <= 40 for label in labels)
