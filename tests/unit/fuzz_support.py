"""Shared pieces of the property-based fuzz tests (tests/unit/test_fuzz_*.py).

Two budgets: the suite's CI profile (a bounded, derandomized number of examples per target, so the
suite stays fast and never flakes) and `make fuzz` (FLUXQ_FUZZ_EXAMPLES, at least 20,000 per
target, fresh random examples each run). Hypothesis prints the counts with
`--hypothesis-show-statistics`.

Every target runs each input under `bounded`, which checks the two resource properties: CPU time
per input, and peak memory traced by tracemalloc (Python objects and numpy buffers) against a
multiple of the input's size. Allocations made inside torch, Pillow or safetensors' Rust code are
invisible to tracemalloc; the targets bound those by checking what comes back instead (tensors
that are views of, or no larger than, the file).
"""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = int(os.environ.get("FLUXQ_FUZZ_EXAMPLES", "0"))  # 0: the CI budget of each target
MAX_SECONDS = 1.0  # CPU seconds for one input (process time: other jobs on the machine do not count)
MAX_ALLOCATION_FACTOR = 16  # peak traced bytes per byte of input ...
ALLOCATION_SLACK = 4 << 20  # ... plus a fixed allowance for interpreter and library overhead


def fuzz_settings(ci_examples: int):
    """Hypothesis settings for one target: `ci_examples` in the suite, FLUXQ_FUZZ_EXAMPLES under make fuzz."""
    return settings(
        max_examples=FUZZ_EXAMPLES or ci_examples,
        derandomize=not FUZZ_EXAMPLES,  # CI: the same examples every run
        deadline=None,  # time is checked by `bounded` as CPU time, robust to a busy machine
        database=None,  # failing examples are kept as @example regressions in the tests instead
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=True,
    )


class Seeds(dict):
    """Valid seed files for a fuzz target; a short repr keeps Hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"Seeds({', '.join(self)})"


@dataclass
class Outcome:
    result: object = None
    error: BaseException | None = None
    cpu_seconds: float = 0.0
    peak_bytes: int = 0


def measured(call, *args, **kwargs) -> Outcome:
    """`call(*args, **kwargs)` with its CPU time and traced memory peak; any exception is returned."""
    outcome = Outcome()
    tracemalloc.start()
    started = time.process_time()
    try:
        outcome.result = call(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the caller checks the type
        outcome.error = error
    finally:
        outcome.cpu_seconds = time.process_time() - started
        outcome.peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return outcome


def bounded(call, input_size: int, *args, **kwargs) -> Outcome:
    """Run `call(*args, **kwargs)` and check time and traced memory; any exception is returned.
    Over the time limit, the call is timed once more and the faster run counts: a collection of
    the whole heap by Python's garbage collector can land inside any call (`make fuzz` saw 1-1.8 s
    calls that took milliseconds when Hypothesis replayed them); a slow input is slow twice."""
    outcome = measured(call, *args, **kwargs)
    if outcome.cpu_seconds > MAX_SECONDS:
        again = measured(call, *args, **kwargs)
        outcome = again if again.cpu_seconds < outcome.cpu_seconds else outcome
    assert outcome.cpu_seconds <= MAX_SECONDS, f"{call.__name__} took {outcome.cpu_seconds:.2f} s of CPU on one input"
    limit = MAX_ALLOCATION_FACTOR * input_size + ALLOCATION_SLACK
    assert outcome.peak_bytes <= limit, (
        f"{call.__name__} traced {outcome.peak_bytes} bytes at peak for a {input_size}-byte input (limit {limit})"
    )
    return outcome


def expect_only(outcome: Outcome, error_type: type[BaseException], *must_name: str) -> None:
    """The call either succeeded or raised `error_type` whose message contains each of `must_name`."""
    if outcome.error is None:
        return
    if not isinstance(outcome.error, error_type):
        raise AssertionError(
            f"{type(outcome.error).__name__} escaped instead of {error_type.__name__}: {outcome.error!r}"
        ) from outcome.error
    message = str(outcome.error)
    for fragment in must_name:
        assert fragment in message, f"error message does not name {fragment!r}: {message}"


# --- mutations of a valid file ----------------------------------------------------------------

ABSURD_U64 = (0, 1, 2, 255, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 62, (1 << 63) - 1,
              1 << 63, (1 << 64) - 1)
PATH_TRICKS = ("..", "../../etc/passwd", "/etc/passwd", "C:\\Windows\\win.ini", "a\\..\\..\\b", "a\x00b",
               "x" * 4096, "\u2024\u2024/evil", "\uff0e\uff0e\uff0fevil", "con", "a/./b", "", " ", ".hidden",
               "\u202eevil", "a" * 255 + ".png")


@st.composite
def mutated_bytes(draw, valid: bytes, boundaries: tuple[int, ...] = ()) -> bytes:
    """`valid` with one to a few mutations: bit flips, truncation (anywhere or at a structural
    boundary), an absurd little-endian integer written at a boundary, a byte run duplicated or
    deleted, or garbage appended."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("flip", "truncate", "truncate_at_boundary", "absurd_int", "duplicate",
                                     "delete", "append")))
        if not data:
            break
        if kind == "flip":
            for _ in range(draw(st.integers(1, 8))):
                position = draw(st.integers(0, len(data) - 1))
                data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "truncate_at_boundary" and boundaries:
            cut = draw(st.sampled_from(boundaries)) + draw(st.integers(-1, 1))
            del data[max(0, cut):]
        elif kind == "absurd_int":
            at = draw(st.sampled_from(boundaries)) if boundaries and draw(st.booleans()) else \
                draw(st.integers(0, len(data) - 1))
            width = draw(st.sampled_from((4, 8)))
            value = draw(st.sampled_from(ABSURD_U64) | st.integers(0, (1 << 64) - 1)) & ((1 << 8 * width) - 1)
            data[at:at + width] = struct.pack("<Q" if width == 8 else "<I", value)
        elif kind == "duplicate":
            start = draw(st.integers(0, len(data) - 1))
            end = draw(st.integers(start, min(len(data), start + 256)))
            data[end:end] = data[start:end]
        elif kind == "delete":
            start = draw(st.integers(0, len(data) - 1))
            del data[start:draw(st.integers(start, min(len(data), start + 64)))]
        else:
            data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def tree_snapshot(root: str) -> set[str]:
    """Every path under `root` (to check that nothing was written)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found
