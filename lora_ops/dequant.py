"""Dequantize GGUF tensor bytes in torch.

The gguf package can dequantize too, but only in numpy, on the CPU. Here the same formulas are
expressed as whole-tensor torch ops, so a weight can stay quantized in (GPU) memory and be
expanded on its own device right before use, also under torch.compile (no Python loop over
blocks, no host sync). Results equal gguf.quants.dequantize: everything is computed in float32
with the same operation order, then cast to the requested dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import gguf
import torch
from gguf import GGMLQuantizationType as QType

from .errors import user_facing

QK_K = 256  # elements per K-quant super-block


@user_facing
class UnsupportedQuantTypeError(ValueError):
    """A GGUF tensor type this pack cannot dequantize (IQ* other than IQ4_NL/IQ4_XS, TQ*, ... or an unknown id)."""


def as_qtype(qtype: int | QType) -> QType:
    """The GGMLQuantizationType for `qtype`, or UnsupportedQuantTypeError for an unknown id."""
    try:
        return QType(int(qtype))
    except ValueError:
        raise UnsupportedQuantTypeError(f"unknown GGML quant type id {int(qtype)}") from None


def quantized_nbytes(qtype: int | QType, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of torch-order `shape` takes when stored as `qtype`."""
    qtype = as_qtype(qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if len(shape) == 0:
        raise ValueError(f"{qtype.name} tensor needs at least one dimension")
    if shape[-1] % block_size != 0:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qtype.name} block size {block_size}")
    return math.prod(shape) // block_size * type_size


def _shifts(step: int, view: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Bit shifts 0, step, 2*step, ... shaped `view`; made on the device (no host copy per call)."""
    return torch.arange(0, math.prod(view) * step, step, dtype=torch.uint8, device=device).reshape(view)


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at (even) byte `offset` of every block, as float32 of shape (n_blocks, 1)."""
    # Every block size is even and `blocks` starts 4-byte aligned, so this is a view, not a copy.
    return blocks.view(torch.float16)[:, offset // 2:offset // 2 + 1].to(torch.float32)


def _low_then_high_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(n, m) bytes -> (n, 2m): the m low nibbles, then the m high nibbles (legacy 32-blocks).
    One broadcast shift rather than a ``torch.cat``: inductor fuses it into the kernel that reads
    the bytes (a cat is a buffer of its own there, see ``fused_dequant``)."""
    n, m = packed.shape
    return ((packed.unsqueeze(-2) >> _shifts(4, (1, 2, 1), packed.device)) & 0x0F).reshape(n, 2 * m)


def _bits_of_le_uint32(four_bytes: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit j at column j."""
    bits = four_bytes.unsqueeze(-1) >> _shifts(1, (1, 1, 8), four_bytes.device)
    return (bits & 1).reshape(-1, 32)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks, 0)
    return blocks[:, 2:].view(torch.int8).to(torch.float32) * d


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks, 0)
    q = _low_then_high_nibbles(blocks[:, 2:]).to(torch.float32) - 8
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _low_then_high_nibbles(blocks[:, 4:]).to(torch.float32)
    return d * q + m


def _five_bit(high_bits_bytes: torch.Tensor, low_nibble_bytes: torch.Tensor) -> torch.Tensor:
    return _low_then_high_nibbles(low_nibble_bytes) | (_bits_of_le_uint32(high_bits_bytes) << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _half(blocks, 0)
    q = _five_bit(blocks[:, 2:6], blocks[:, 6:]).to(torch.float32) - 16
    return d * q


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _half(blocks, 0), _half(blocks, 2)
    q = _five_bit(blocks[:, 4:8], blocks[:, 8:]).to(torch.float32)
    return d * q + m


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble: scale, high nibble: min), qs[64] (2 bits each), d, dmin
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _half(blocks, 80), _half(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts(2, (1, 1, 4, 1), blocks.device)) & 3
    q = q.reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask[32] (3rd bit, inverted), qs[64] (low 2 bits), scales[12] (16 x 6-bit, signed), d
    n = blocks.shape[0]
    device = blocks.device
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _half(blocks, 108)
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(4, (1, 2, 1), device)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(2, (1, 4, 1), device)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.float32) - 32
    dl = (d * sc).reshape(n, 16, 1)
    ql = ((qs.reshape(n, 2, 1, 32) >> _shifts(2, (1, 1, 4, 1), device)) & 3).reshape(n, 16, 16)
    qh = ((hmask.reshape(n, 1, 1, 32) >> _shifts(1, (1, 1, 8, 1), device)) & 1).reshape(n, 16, 16)
    # A set hmask bit means "no offset"; a clear one subtracts 4.
    q = ql.to(torch.float32) - ((qh ^ 1) << 2).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each (n, 8)."""
    n = packed.shape[0]
    grouped = packed.reshape(n, 3, 1, 4)
    d, m, m_d = grouped[:, 0], grouped[:, 1], grouped[:, 2]
    # Scales 0-3 and 4-7 as two rows of one select (not a torch.cat: see _low_then_high_nibbles).
    first = torch.arange(2, device=packed.device).reshape(1, 2, 1) == 0
    sc = torch.where(first, d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)).reshape(n, 8)
    mn = torch.where(first, m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)).reshape(n, 8)
    return sc, mn


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): per 32 bytes, the low nibbles then the high nibbles."""
    n = qs.shape[0]
    return ((qs.reshape(n, 4, 1, 32) >> _shifts(4, (1, 1, 2, 1), qs.device)) & 0x0F).reshape(n, 8, 32)


def _q4_k_like(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    return (dl * q.to(torch.float32) - ml).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d, dmin, scales[12], qs[128]
    return _q4_k_like(blocks, _k_nibbles(blocks[:, 16:]))


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d, dmin, scales[12], qh[32] (5th bit), qs[128]
    n = blocks.shape[0]
    qh = blocks[:, 16:48].reshape(n, 1, 1, 32) >> _shifts(1, (1, 1, 8, 1), blocks.device)
    q = _k_nibbles(blocks[:, 48:]) | ((qh & 1).reshape(n, 8, 32) << 4)
    return _q4_k_like(blocks, q)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d
    n = blocks.shape[0]
    device = blocks.device
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = _half(blocks, 208)
    dl = (d * scales.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    low = ((ql.reshape(n, 2, 1, 64) >> _shifts(4, (1, 1, 2, 1), device)) & 0x0F).reshape(n, 8, 32)
    high = ((qh.reshape(n, 2, 1, 32) >> _shifts(2, (1, 1, 4, 1), device)) & 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.float32) - 32
    return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


# IQ4's non-linear 4-bit code book (llama.cpp's kvalues_iq4nl)
_IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _iq4_lookup(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(_IQ4_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    # d, qs[16] (32 codes: low nibbles, then high nibbles)
    d = _half(blocks, 0)
    return d * _iq4_lookup(_low_then_high_nibbles(blocks[:, 2:]))


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    # d, scales_h (uint16: 8 x 2 high bits), scales_l[4] (8 x 4 low bits), qs[128] (8 sub-blocks of 32 codes)
    n = blocks.shape[0]
    device = blocks.device
    d = _half(blocks, 0)
    # the uint16's 2-bit fields, taken per byte (little-endian): fields 0-3 from byte 2, 4-7 from byte 3
    high = ((blocks[:, 2:4].reshape(n, 2, 1) >> _shifts(2, (1, 1, 4), device)) & 3).reshape(n, 8)
    low = ((blocks[:, 4:8].reshape(n, 4, 1) >> _shifts(4, (1, 1, 2), device)) & 0x0F).reshape(n, 8)
    scales = (low | (high << 4)).to(torch.float32) - 32
    dl = (d * scales).reshape(n, 8, 1)
    codes = ((blocks[:, 8:].reshape(n, 8, 1, 16) >> _shifts(4, (1, 1, 2, 1), device)) & 0x0F).reshape(n, 8, 32)
    return (dl * _iq4_lookup(codes)).reshape(n, QK_K)


_BLOCK_DEQUANTIZERS: dict[QType, Callable[[torch.Tensor], torch.Tensor]] = {
    QType.Q8_0: _q8_0,
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
    QType.Q5_0: _q5_0,
    QType.Q5_1: _q5_1,
    QType.Q2_K: _q2_k,
    QType.Q3_K: _q3_k,
    QType.Q4_K: _q4_k,
    QType.Q5_K: _q5_k,
    QType.Q6_K: _q6_k,
    QType.IQ4_NL: _iq4_nl,
    QType.IQ4_XS: _iq4_xs,
}

_FLOAT_TYPES: dict[QType, torch.dtype] = {
    QType.F32: torch.float32,
    QType.F16: torch.float16,
    QType.BF16: torch.bfloat16,
}

BLOCK_QTYPES: frozenset[QType] = frozenset(_BLOCK_DEQUANTIZERS)
SUPPORTED_QTYPES: frozenset[QType] = frozenset(_FLOAT_TYPES) | BLOCK_QTYPES


def dequantize(
    raw: torch.Tensor,
    qtype: int | QType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Expand the GGUF bytes `raw` (uint8, contiguous, any shape) of a `qtype` tensor.

    Returns a `dtype` tensor of torch-order `shape` on raw's device. For F32/F16/BF16 in their
    own dtype the result is a view sharing raw's memory.
    """
    if raw.dtype != torch.uint8:
        raise TypeError(f"dequantize expects the tensor's bytes as uint8, got {raw.dtype}")
    qtype = as_qtype(qtype)
    if qtype not in SUPPORTED_QTYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_QTYPES))
        raise UnsupportedQuantTypeError(f"GGUF quant type {qtype.name} is not supported (supported: {supported})")
    shape = tuple(shape)
    expected = quantized_nbytes(qtype, shape)
    if raw.numel() != expected:
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {raw.numel()}")
    flat = raw.reshape(-1)
    # Wider dtype views need a 4-byte aligned start. File data always is; a slice of some other
    # buffer may not be. (storage_offset() cannot be traced: compiled callers pass aligned data.)
    if not torch.compiler.is_compiling() and flat.storage_offset() % 4:
        flat = flat.clone()
    if qtype in _FLOAT_TYPES:
        return flat.view(_FLOAT_TYPES[qtype]).reshape(shape).to(dtype)
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    values = _BLOCK_DEQUANTIZERS[qtype](flat.reshape(-1, type_size))
    return values.reshape(shape).to(dtype)
