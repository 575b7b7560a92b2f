"""Quantizing float weights to GGUF types with well-kept reference code, never a hand port.

The legacy block types (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) and the float types go through
`gguf.quants.quantize` (numpy). The gguf package has no K-quant quantizer, so Q6_K ... Q2_K go
through ggml's own reference quantizer, `ggml_quantize_chunk` in `libggml-base`, which the PyPI
package `libggml-python` ships prebuilt (no Python bindings: called with ctypes). Without an
importance matrix `ggml_quantize_chunk` runs ggml's `quantize_row_*_ref` for these types, the code
llama.cpp's `llama-quantize` runs for them.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import os

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from .errors import user_facing

NUMPY_TYPES = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q5_0, QType.Q5_1, QType.Q4_0, QType.Q4_1)
K_QUANT_TYPES = (QType.Q6_K, QType.Q5_K, QType.Q4_K, QType.Q3_K, QType.Q2_K)
# What a user may ask for as the main type of a file (F32 only as a policy's high-precision type).
TARGET_TYPES = (QType.F16, QType.BF16, QType.Q8_0, QType.Q5_1, QType.Q5_0, QType.Q4_1, QType.Q4_0, *K_QUANT_TYPES)
TARGET_NAMES = tuple(t.name for t in TARGET_TYPES)


@user_facing
class QuantizeError(ValueError):
    """A type that cannot be written, or a quantizer that is not available."""

    @staticmethod
    def unknown(name: str) -> str:
        return f"unknown GGUF type {name!r}: this pack writes {', '.join(TARGET_NAMES)}"


def target_type(name: str) -> QType:
    """The GGUF type called `name` (e.g. "Q4_K"), if it is one this pack writes."""
    for qtype in TARGET_TYPES:
        if qtype.name == name:
            return qtype
    raise QuantizeError(QuantizeError.unknown(name))


@functools.lru_cache(maxsize=1)
def _ggml() -> ctypes.CDLL:
    try:
        folder = importlib.resources.files("libggml")
    except ModuleNotFoundError:
        raise QuantizeError(
            "K-quant types need ggml's reference quantizer: install the PyPI package libggml-python "
            "(pip install libggml-python) in ComfyUI's Python"
        ) from None
    candidates = [folder / sub / "libggml-base.so" for sub in ("lib64", "lib")]
    candidates += [folder / sub / name for sub in ("lib", "bin") for name in ("libggml-base.dylib", "ggml-base.dll")]
    for candidate in candidates:
        if os.path.exists(str(candidate)):
            lib = ctypes.CDLL(str(candidate))
            break
    else:
        raise QuantizeError(f"libggml-python is installed but holds no libggml-base library under {folder}")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def k_quants_available() -> str | None:
    """None when the K-quant quantizer loads, else why not."""
    try:
        _ggml()
    except (QuantizeError, OSError) as error:
        return str(error)
    return None


def fits(qtype: QType, shape: tuple[int, ...]) -> bool:
    """Whether rows of this length split into whole blocks of `qtype`."""
    return shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def quantize(array: np.ndarray, qtype: QType) -> np.ndarray:
    """The GGUF bytes (uint8, shape (..., row bytes)) of the float32 `array` (torch order) as `qtype`."""
    qtype = QType(qtype)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not fits(qtype, array.shape):
        raise QuantizeError(f"rows of {array.shape[-1]} values do not split into {qtype.name} blocks of "
                            f"{gguf.GGML_QUANT_SIZES[qtype][0]}")
    byte_shape = gguf.quants.quant_shape_to_byte_shape(array.shape, qtype)
    if qtype in NUMPY_TYPES:
        return gguf.quants.quantize(array, qtype).view(np.uint8).reshape(byte_shape)
    if qtype not in K_QUANT_TYPES:
        raise QuantizeError(f"no quantizer for {qtype.name}")
    lib = _ggml()
    if lib.ggml_quantize_requires_imatrix(int(qtype)):  # none of K_QUANT_TYPES does; guards a future ggml
        raise QuantizeError(f"ggml needs an importance matrix for {qtype.name}")
    row_length = array.shape[-1]
    rows = array.size // row_length
    out = np.empty(byte_shape, dtype=np.uint8)
    written = lib.ggml_quantize_chunk(int(qtype), array.ctypes.data, out.ctypes.data, 0, rows, row_length, None)
    if written != out.nbytes:
        raise QuantizeError(f"ggml wrote {written} bytes for a {qtype.name} tensor of shape {array.shape}, "
                            f"expected {out.nbytes}")
    return out
