"""Write GGUF files: small demo/test FLUX models and fixtures (`write_gguf`), and real models
streamed tensor by tensor in the published FLUX GGUF layout (`write_gguf_stream`).

For fixtures, K-quant tensors are synthesized (see `encode`): fast, and only shape and scale
matter there. Real models are quantized by `ggml_quants.quantize` (gguf's numpy quantizers, and
ggml's reference quantizer for the K-quants).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from .atomic import atomic_path, check_space
from .dequant import quantized_nbytes
from .ggml_quants import fits, quantize

QTypeRule = Callable[[str, np.ndarray], QType]

_NUMPY_QUANTIZABLE = frozenset(
    {QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1}
)

# Byte offsets of the fp16 scale fields inside one block: (d, dmin), dmin None for types without a min.
_K_QUANT_SCALE_FIELDS: dict[QType, tuple[int, int | None]] = {
    QType.Q2_K: (80, 82),
    QType.Q3_K: (108, None),
    QType.Q4_K: (0, 2),
    QType.Q5_K: (0, 2),
    QType.Q6_K: (208, None),
    # IQ4 (text-encoder files): no quantizer in gguf or libggml-python either, so synthesized alike
    QType.IQ4_NL: (0, None),
    QType.IQ4_XS: (0, None),
}

# Blocks dequantized to estimate the synthetic tensor's statistics; enough for a stable estimate,
# small enough that encoding a multi-GB model stays fast.
_K_QUANT_SAMPLE_BLOCKS = 256

# FLUX entry/exit layers that the usual FLUX GGUF conversions keep in high precision, and Chroma's
# approximator (distilled_guidance_layer: ~3% of its weights, it computes every block's modulation).
# city96's quantize patch has no rule for the approximator (it would get the main type), but NF4
# (4-bit) quantization of it is reported to hurt Chroma's images badly (diffusers PR #11698; SD.Next
# skips it), so it stays at the file's float type like the entry/exit layers.
_FLUX_HIGH_PRECISION = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.",
                        "distilled_guidance_layer.")
_FLUX_QUANTIZED_BLOCKS = ("double_blocks.", "single_blocks.")


def encode(array: np.ndarray, qtype: int | QType, rng: np.random.Generator | None = None) -> np.ndarray:
    """Return the raw GGUF bytes (uint8, shape (..., row_bytes)) of a float32 `array` as `qtype`.

    `array` is in torch order (rows first). F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are
    real quantizations (gguf.quants.quantize).

    K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_NL / IQ4_XS are NOT a quantization of `array`: the blocks are
    random bytes with finite fp16 scale fields, scaled so the dequantized tensor has about the
    RMS of `array` and a mean near zero. Only the shape and the scale of `array` survive. Use it
    for demo and test models, never to convert a real model. `rng` drives that randomness
    (default: a generator seeded with 0, so output is reproducible).
    """
    qtype = QType(qtype)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 0:
        raise ValueError("cannot encode a 0-d array as a GGUF tensor")
    byte_shape = gguf.quants.quant_shape_to_byte_shape(array.shape, qtype)
    if qtype in _NUMPY_QUANTIZABLE:
        # F32/F16 come back as float arrays: expose their bytes like the other types.
        return gguf.quants.quantize(array, qtype).view(np.uint8).reshape(byte_shape)
    if qtype in _K_QUANT_SCALE_FIELDS:
        rng = rng if rng is not None else np.random.default_rng(0)
        return _synthesize_k_quant(array, qtype, rng).reshape(byte_shape)
    raise ValueError(f"cannot encode {qtype.name}: no numpy quantizer and no synthesizer for it")


def _synthesize_k_quant(array: np.ndarray, qtype: QType, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(array.size // block_size, type_size), dtype=np.uint8)
    d_at, dmin_at = _K_QUANT_SCALE_FIELDS[qtype]

    def set_scales(target: np.ndarray, d: float, dmin: float) -> None:
        target[:, d_at:d_at + 2] = np.array([d], dtype=np.float16).view(np.uint8)
        if dmin_at is not None:
            target[:, dmin_at:dmin_at + 2] = np.array([dmin], dtype=np.float16).view(np.uint8)

    # Dequantization is linear in (d, dmin): measure the unit contribution of each on a sample.
    sample = blocks[:_K_QUANT_SAMPLE_BLOCKS].copy()
    set_scales(sample, 1.0, 0.0)
    scaled_part = gguf.quants.dequantize(sample, qtype).astype(np.float64)
    if dmin_at is None:
        unit = scaled_part
    else:
        set_scales(sample, 0.0, 1.0)
        min_part = gguf.quants.dequantize(sample, qtype).astype(np.float64)
        # Pick the dmin/d ratio that cancels the mean (min_part is <= 0, scaled_part >= 0).
        min_mean = min_part.mean()
        dmin_ratio = -scaled_part.mean() / min_mean if min_mean != 0 else 0.0
        unit = scaled_part + dmin_ratio * min_part

    unit_rms = float(np.sqrt(np.mean(unit**2)))
    target_rms = float(np.sqrt(np.mean(array.astype(np.float64) ** 2)))
    d = target_rms / unit_rms if unit_rms > 0 else 0.0
    dmin = d * dmin_ratio if dmin_at is not None else 0.0
    if not np.isfinite(np.float16(d)) or not np.isfinite(np.float16(dmin)):
        raise ValueError(f"RMS {target_rms:g} is too large for the fp16 scales of {qtype.name}")
    set_scales(blocks, d, dmin)
    return blocks


def flux_qtype_for(target_qtype: int | QType) -> QTypeRule:
    """The usual FLUX GGUF layout: transformer block matrices in `target_qtype`, the rest kept precise.

    2-D weights inside double/single blocks get `target_qtype` (F16 when their row length is not
    a multiple of its block size); the input/output layers (img_in, txt_in, time_in, vector_in,
    guidance_in, final_layer) and any other matrix F16; 1-D tensors (biases, norm scales) F32,
    since they are tiny and read on every step.
    """
    target_qtype = QType(target_qtype)
    block_size = gguf.GGML_QUANT_SIZES[target_qtype][0]

    def qtype_for(name: str, array: np.ndarray) -> QType:
        if array.ndim < 2:
            return QType.F32
        if any(part in name for part in _FLUX_HIGH_PRECISION):
            return QType.F16
        if array.ndim == 2 and any(part in name for part in _FLUX_QUANTIZED_BLOCKS):
            return target_qtype if array.shape[-1] % block_size == 0 else QType.F16
        return QType.F16

    return qtype_for


def write_gguf(
    path: str | os.PathLike[str],
    tensors: dict[str, np.ndarray],
    qtype_for: QTypeRule,
    arch: str = "flux",
    rng: np.random.Generator | None = None,
    metadata: dict[str, str | int | float | bool | list] | None = None,
) -> None:
    """Write `tensors` (torch-order float arrays) to a GGUF file at `path`, atomically.

    `qtype_for(name, array)` picks each tensor's type. The file appears complete or not at all:
    it is written to a temporary file next to `path`, then renamed over it.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    writer = gguf.GGUFWriter(temp_path, arch=arch)
    try:
        for key, value in (metadata or {}).items():
            _add_metadata(writer, key, value)
        for name, array in tensors.items():
            array = np.asarray(array, dtype=np.float32)
            qtype = QType(qtype_for(name, array))
            writer.add_tensor(name, encode(array, qtype, rng), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temp_path, path)
    except BaseException:
        writer.close()
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: str | int | float | bool | list) -> None:
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value)
    elif isinstance(value, float):
        writer.add_float64(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        writer.add_array(key, value)
    elif isinstance(value, list) and value and all(type(item) is int for item in value):
        writer.add_array(key, value)  # gguf writes a list of ints as INT32, as llama.cpp's token_type
    else:
        raise TypeError(f"metadata {key!r}: only str, int, float, bool and non-empty lists of str or int are "
                        f"supported, got {type(value).__name__}")


# --- real models, streamed ----------------------------------------------------------------------

ShapeRule = Callable[[str, tuple[int, ...]], QType]

# city96's converter (ComfyUI-GGUF tools/convert.py) keeps tensors of at most this many values in F32.
_SMALL_TENSOR_VALUES = 1024

# llama.cpp's file-type code per main type. A K-quant file here is one type throughout (bar the
# high-precision tensors), which is llama.cpp's "_S" mix for FLUX: its "_M" rules raise the fused
# qkv and the FFN output, its "_S" rules leave FLUX's (BFL-named) tensors at the main type.
_FILE_TYPES = {
    QType.F16: gguf.LlamaFileType.MOSTLY_F16, QType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    QType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, QType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    QType.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, QType.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
}  # fmt: skip


def published_flux_qtype(target_qtype: int | QType) -> ShapeRule:
    """The per-tensor types of the published FLUX GGUFs (city96's convert.py + llama-quantize patch):
    1-D tensors and tensors of at most 1024 values F32; the input/output layers (img_in, txt_in,
    time_in, vector_in, guidance_in, final_layer) and Chroma's approximator (distilled_guidance_layer)
    at the float type of the conversion (BF16 for a BF16 file, else F16); every other matrix
    `target_qtype`, or F16 where its rows do not split into whole blocks of it. FLUX.2's tensors (its
    global modulation layers outside the blocks included) follow the same name rules: the patch's
    FLUX rules name only these layers."""
    target_qtype = QType(target_qtype)
    high = QType.BF16 if target_qtype == QType.BF16 else QType.F16

    def qtype_for(name: str, shape: tuple[int, ...]) -> QType:
        if len(shape) < 2 or int(np.prod(shape)) <= _SMALL_TENSOR_VALUES:
            return QType.F32
        if any(part in name for part in _FLUX_HIGH_PRECISION):
            return high
        return target_qtype if fits(target_qtype, shape) else QType.F16

    return qtype_for


def write_gguf_stream(
    path: str | os.PathLike[str],
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    load: Callable[[str], np.ndarray],
    qtype_for: ShapeRule,
    file_type: int | QType,
    arch: str = "flux",
    metadata: dict[str, str | int | float | bool] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, QType]:
    """Write a GGUF at `path` holding `shapes`' tensors (torch order) in their `qtype_for` types.

    Only one tensor is in memory at a time: the header is written from the shapes, then each
    tensor is `load`ed (float32, torch order), quantized and appended. The file is written under a
    temporary name and renamed when complete (never half-written); an existing file is refused
    unless `overwrite`, and so is a disk without room for the tensor data (`DiskFullError`, as is
    running out of space while writing). Metadata as city96's converter writes it: `general.architecture`,
    `general.quantization_version`, `general.file_type` (from `file_type`, the main type).
    Returns the type of each tensor.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    plan = [(name, tuple(int(d) for d in shape), QType(qtype_for(name, tuple(shape)))) for name, shape in shapes]
    # the tensor data is known from the plan: a disk too small is refused now, not after minutes
    check_space(path, sum(quantized_nbytes(qtype, shape) for _, shape, qtype in plan))
    with atomic_path(path) as temporary:
        writer = gguf.GGUFWriter(temporary, arch=arch)
        try:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_file_type(int(_FILE_TYPES[QType(file_type)]))
            for key, value in (metadata or {}).items():
                _add_metadata(writer, key, value)
            for name, shape, qtype in plan:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), quantized_nbytes(qtype, shape), raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for index, (name, shape, qtype) in enumerate(plan):
                array = np.asarray(load(name), dtype=np.float32)
                if tuple(array.shape) != shape:
                    raise ValueError(f"tensor {name!r}: loaded shape {tuple(array.shape)}, announced {shape}")
                writer.write_tensor_data(quantize(array, qtype))
                if progress is not None:
                    progress(index + 1, len(plan), name)
        finally:
            writer.close()
    return {name: qtype for name, _, qtype in plan}
