"""Fused dequantization kernels for the eager (uncompiled) path: each a compiled copy of an eager function.

Eager dequantization is a chain of separate kernels (codes to float32, times the scales, cast to
the compute dtype), each a full pass over memory: ~19 bytes moved per Q8_0 parameter before the
matmul reads its 2. Here the same eager function (``qlinear``'s dequantize or one-token GEMV) is
compiled by inductor ALONE, never the model: one kernel that reads the quantized bytes once and
writes the compute-dtype weight once (DEQUANT) or never (GEMV: the weight is consumed inside a
row-reduction kernel). The eager function stays the fallback and the oracle: the kernel runs its
float32 operations in the same order, so DEQUANT equals eager bit for bit (tests/unit/test_fused_dequant.py);
GEMV sums in another order, within float32 summation error like the eager chunked GEMV.

One compiled function per (plan, type, layout, shape, dtype, device type), each with a code
object of its own: dynamo keeps compiled graphs per code object, at most ``recompile_limit`` (8)
of them, and the FLUX shapes times the types of a mixed file are more; shapes stay static (no
symbolic index math in the kernels). Each key compiles once per process (inductor's on-disk
cache makes a second process faster).

``FLUXQ_FUSED_DEQUANT`` (read at each call): ``auto`` (default) fuses CUDA tensors only; ``on``
fuses on the CPU too; ``off`` never. Not on the CPU by default: there inductor builds C++ with
the system compiler, 0.3-11 s per key measured on a 2-core machine, for a gain of ~1.1-1.7x on the
dequantization alone (README, Performance) and every ComfyUI or test process would pay the builds
again; the unit tests and the benchmark opt in explicitly. Inside a ``torch.compile`` of the model
(core ``TorchCompileModel``) nothing here runs: the outer graph inlines the eager code and fuses
it with the fold and the matmul's neighbours itself.

A build that fails (no Triton on a CUDA install, no C++ compiler for ``on`` on the CPU, an
inductor error) turns fusing off for that device type for the process, says so once in the log
and hands the call back to eager; the first successful build's time is logged once too (later
builds at debug level), never once per layer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
import warnings
from collections.abc import Callable, Hashable

import torch

from .errors import user_facing

log = logging.getLogger("fluxq")

MODE_ENV = "FLUXQ_FUSED_DEQUANT"
MODES = ("auto", "on", "off")

# What builds the kernels; the unit tests of this module's bookkeeping swap in dynamo's "eager"
# backend (same tracing, guards and recompiles, no C++ build).
BACKEND = "inductor"

_lock = threading.Lock()
_kernels: dict[tuple, Callable] = {}
_failed: dict[str, str] = {}  # device type -> why fusing is off there
_build_seconds: dict[tuple, float] = {}  # key -> first call's time (compile + run), for stats and the bench


@user_facing
class FusedModeError(ValueError):
    """FLUXQ_FUSED_DEQUANT holds something other than auto, on or off."""


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise FusedModeError(f"{MODE_ENV}={os.environ[MODE_ENV]!r}: expected one of {', '.join(MODES)}")
    return value


def enabled_for(device: torch.device) -> bool:
    """Whether a call on ``device`` takes a fused kernel now (mode, device type, earlier failures)."""
    if torch.compiler.is_compiling():
        return False
    current = mode()
    if current == "off" or device.type in _failed:
        return False
    return current == "on" or device.type == "cuda"


def _own_code_copy(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own (same body, globals and defaults), named ``name``."""
    # co_qualname (what tracebacks and profilers print) exists from Python 3.11 on
    names = {"co_name": name, **({"co_qualname": name} if hasattr(fn.__code__, "co_qualname") else {})}
    code = fn.__code__.replace(**names)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _kernel_name(key: tuple) -> str:
    return "fluxq_fused_" + "_".join(str(getattr(part, "name", part)).replace("torch.", "") for part in key)


def run(impl: Callable[..., torch.Tensor], key: tuple[Hashable, ...], device: torch.device, *args) -> torch.Tensor | None:
    """``impl(*args)`` through its compiled kernel for ``key`` (the plan, type, layout, shape and
    dtype that ``impl``'s trace depends on); None where fusing is off or the build failed: the
    caller then runs ``impl`` eagerly."""
    if not enabled_for(device):
        return None
    full_key = (*key, device.type)
    kernel = _kernels.get(full_key)
    first = kernel is None
    start = time.perf_counter()
    try:
        if first:
            # torch.compile itself may refuse (a Python version dynamo does not support yet)
            with _lock:
                kernel = _kernels.get(full_key)
                if kernel is None:
                    kernel = torch.compile(_own_code_copy(impl, _kernel_name(full_key)), fullgraph=True,
                                           dynamic=False, backend=BACKEND)
                    _kernels[full_key] = kernel
        # No autograd: the bytes have no gradient, and one grad mode for every caller keeps one
        # compiled graph per key (dynamo guards on it; ComfyUI samples in inference mode and the
        # trainer outside it, so a process that does both compiles a key at most twice).
        with torch.no_grad(), warnings.catch_warnings():
            # inductor's C++ backend warns when one kernel reads fp16 scales and writes bf16
            warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
            out = kernel(*args)
    except torch.OutOfMemoryError:
        raise  # eager would need more memory still
    except Exception as exc:  # noqa: BLE001 - any build failure falls back to the eager oracle
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        with _lock:
            if device.type not in _failed:
                _failed[device.type] = reason
                log.warning("[FluxQ] fused dequantization is off on %s for this process (eager kernels instead): "
                            "compiling %s failed: %s", device.type, _kernel_name(full_key), reason)
        return None
    if first and full_key not in _build_seconds:
        seconds = time.perf_counter() - start
        with _lock:
            _build_seconds[full_key] = seconds
            first_ever = len(_build_seconds) == 1
        if first_ever:
            log.info("[FluxQ] fused dequantization: first kernel (%s) compiled in %.1f s; each new (type, shape, "
                     "dtype) compiles once, logged at debug level (%s=off turns fusing off)",
                     _kernel_name(full_key), seconds, MODE_ENV)
        else:
            log.debug("[FluxQ] fused dequantization: %s compiled in %.1f s", _kernel_name(full_key), seconds)
    return out


def stats() -> dict:
    """Kernels built so far, their first-call seconds, and the device types where fusing failed."""
    with _lock:
        return {"kernels": len(_kernels), "build_seconds": dict(_build_seconds), "failed": dict(_failed)}


def reset() -> None:
    """Forget every kernel and failure (tests; a process otherwise keeps them)."""
    with _lock:
        _kernels.clear()
        _failed.clear()
        _build_seconds.clear()
