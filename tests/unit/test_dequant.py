"""Oracle tests: our torch dequantization against gguf's numpy one, on valid but hostile blocks."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from lora_ops.dequant import (
    SUPPORTED_QTYPES,
    UnsupportedQuantTypeError,
    dequantize,
    quantized_nbytes,
)

# Byte offsets of each block type's fp16 scale fields.
SCALE_FIELDS = {
    QType.Q8_0: (0,),
    QType.Q4_0: (0,),
    QType.Q4_1: (0, 2),
    QType.Q5_0: (0,),
    QType.Q5_1: (0, 2),
    QType.Q2_K: (80, 82),
    QType.Q3_K: (108,),
    QType.Q4_K: (0, 2),
    QType.Q5_K: (0, 2),
    QType.Q6_K: (208,),
    QType.IQ4_NL: (0,),
    QType.IQ4_XS: (0,),
}
NUMPY_QUANTIZABLE = [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1]


def row_shapes(block_size: int) -> list[tuple[int, ...]]:
    return [(1, block_size), (3, 2 * block_size), (2, 3, block_size), (4 * block_size,)]


def oracle(raw: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, qtype)).reshape(shape))


def random_finite_halves(rng: np.random.Generator, n: int) -> np.ndarray:
    """Any finite fp16 bit pattern: zeros, subnormals, negatives and the largest values included."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    bits[::7] = 0x0000  # +0
    bits[1::7] = 0x7BFF  # 65504, the largest finite half
    bits[2::7] = 0x8001  # smallest negative subnormal
    not_finite = (bits & 0x7C00) == 0x7C00
    bits[not_finite] &= 0xBBFF  # clear an exponent bit: finite, same sign
    return bits


def random_valid_blocks(qtype: QType, n_blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in SCALE_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = random_finite_halves(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks


def hostile_floats(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Normal data with rows at extreme scales, an all-zero row and an all-negative row."""
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(shape).astype(np.float32)
    rows = data.reshape(-1, shape[-1])
    scales = np.array([1e-6, 1.0, 3e3, 0.0, 1.0, 5e-2], dtype=np.float32)
    rows *= scales[np.arange(rows.shape[0]) % len(scales)][:, None]
    rows[4 % rows.shape[0]] = -np.abs(rows[4 % rows.shape[0]]) - 0.5
    return data


def test_supported_types_are_exactly_the_documented_ones():
    assert SUPPORTED_QTYPES == set(NUMPY_QUANTIZABLE) | set(SCALE_FIELDS)


@pytest.mark.parametrize("qtype", list(SCALE_FIELDS), ids=lambda t: t.name)
def test_random_valid_blocks_match_gguf(qtype):
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    for seed, shape in enumerate(row_shapes(block_size)):
        n_blocks = int(np.prod(shape)) // block_size
        raw = random_valid_blocks(qtype, n_blocks, seed)
        ours = dequantize(torch.from_numpy(raw.reshape(-1)), qtype, shape)
        expected = oracle(raw, qtype, shape)
        assert ours.shape == shape and ours.dtype == torch.float32
        assert torch.isfinite(expected).all()
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("qtype", NUMPY_QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_real_data_matches_gguf(qtype):
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    block_size = max(block_size, 32)
    for seed, shape in enumerate([(6, 4 * block_size), (2, 3, block_size), (6 * block_size,)]):
        data = hostile_floats(shape, seed)
        raw = gguf.quants.quantize(data, qtype).view(np.uint8)
        # Rows shaped (rows, row_bytes), as read from a file.
        ours = dequantize(torch.from_numpy(raw), qtype, shape)
        torch.testing.assert_close(ours, oracle(raw, qtype, shape), rtol=1e-6, atol=0)


@pytest.mark.parametrize("qtype", [QType.F16, QType.BF16, QType.Q4_1, QType.Q3_K, QType.Q5_K], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_is_the_rounded_float32_result(qtype, dtype):
    block_size = max(gguf.GGML_QUANT_SIZES[qtype][0], 32)
    shape = (4, 2 * block_size)
    if qtype in NUMPY_QUANTIZABLE:
        raw = gguf.quants.quantize(np.random.default_rng(7).standard_normal(shape).astype(np.float32), qtype)
        raw = raw.view(np.uint8)
    else:
        raw = random_valid_blocks(qtype, int(np.prod(shape)) // block_size, 7)
        raw[:, 0:4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # keep |values| < fp16 max
    ours = dequantize(torch.from_numpy(raw), qtype, shape, dtype=dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, oracle(raw, qtype, shape).to(dtype))


@pytest.mark.parametrize("start", [5, 6, 8])
@pytest.mark.parametrize("qtype", [QType.Q5_0, QType.Q6_K, QType.F32], ids=lambda t: t.name)
def test_raw_from_an_offset_inside_a_larger_buffer(qtype, start):
    shape = (2, 256)
    if qtype == QType.F32:
        raw = np.random.default_rng(11).standard_normal(shape).astype(np.float32).view(np.uint8).reshape(-1)
    else:
        raw = random_valid_blocks(qtype, 512 // gguf.GGML_QUANT_SIZES[qtype][0], 11).reshape(-1)
    buffer = torch.zeros(raw.size + start, dtype=torch.uint8)
    buffer[start:] = torch.from_numpy(raw)
    ours = dequantize(buffer[start:], qtype, shape)
    torch.testing.assert_close(ours, oracle(raw, qtype, shape), rtol=1e-6, atol=0)


@pytest.mark.parametrize("qtype, name", [(QType.IQ2_XXS, "IQ2_XXS"), (QType.TQ1_0, "TQ1_0"), (QType.Q8_1, "Q8_1"), (99, "99")])
def test_unsupported_types_are_named(qtype, name):
    with pytest.raises(UnsupportedQuantTypeError, match=name):
        dequantize(torch.zeros(66, dtype=torch.uint8), qtype, (1, 256))


def test_unsupported_type_error_is_a_value_error():
    assert issubclass(UnsupportedQuantTypeError, ValueError)


def test_byte_count_must_match_shape():
    with pytest.raises(ValueError, match="needs 34 bytes, got 36"):
        dequantize(torch.zeros(36, dtype=torch.uint8), QType.Q8_0, (1, 32))


def test_raw_must_be_bytes():
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(8, dtype=torch.float32), QType.F32, (8,))


def test_quantized_nbytes():
    assert quantized_nbytes(QType.Q4_K, (3072, 3072)) == 3072 * 12 * 144
    assert quantized_nbytes(QType.Q8_0, (2, 3, 64)) == 6 * 2 * 34
    assert quantized_nbytes(QType.BF16, (5,)) == 10
    assert quantized_nbytes(int(QType.F32), (7, 3)) == 84
    with pytest.raises(ValueError, match="not a multiple of the Q6_K block size 256"):
        quantized_nbytes(QType.Q6_K, (4, 100))


def test_traces_as_one_graph_for_torch_compile():
    # fullgraph=True fails on any graph break (Python loop over data, .item(), untraceable call);
    # the "eager" backend checks tracing without needing a C++ compiler.
    shape = (2, 256)
    for qtype in sorted(SUPPORTED_QTYPES):
        block_size = gguf.GGML_QUANT_SIZES[qtype][0]
        if qtype in SCALE_FIELDS:
            raw = random_valid_blocks(qtype, 512 // block_size, 13)
        else:
            raw = gguf.quants.quantize(np.random.default_rng(13).standard_normal(shape).astype(np.float32), qtype)
        raw = torch.from_numpy(raw.view(np.uint8).reshape(-1))
        torch._dynamo.reset()
        compiled = torch.compile(dequantize, fullgraph=True, backend="eager")
        assert torch.equal(compiled(raw, qtype, shape, torch.bfloat16), dequantize(raw, qtype, shape, torch.bfloat16))
