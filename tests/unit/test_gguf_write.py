import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from lora_ops.dequant import dequantize
from lora_ops.gguf_file import read_gguf
from lora_ops.gguf_write import encode, flux_qtype_for, write_gguf

K_QUANTS = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]


def _reference_dequantize(raw: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).reshape(shape)


@pytest.mark.parametrize(
    "qtype, tolerance",
    [(QType.F32, 0.0), (QType.F16, 1e-3), (QType.BF16, 1e-2), (QType.Q8_0, 0.02), (QType.Q5_1, 0.1), (QType.Q4_0, 0.2)],
)
def test_encode_real_quantization_approximates_input(qtype, tolerance):
    array = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    raw = encode(array, qtype)
    assert raw.dtype == np.uint8 and raw.shape[0] == 8
    error = np.abs(_reference_dequantize(raw, qtype, array.shape) - array).max() / np.abs(array).max()
    assert error <= tolerance


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_encode_k_quant_is_valid_with_matching_scale(qtype):
    array = np.random.default_rng(2).normal(0.0, 0.05, size=(32, 512)).astype(np.float32)
    raw = encode(array, qtype, np.random.default_rng(3))
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.shape == (32, 512 // block_size * type_size)
    values = _reference_dequantize(raw, qtype, array.shape)
    assert np.isfinite(values).all()
    rms = np.sqrt(np.mean(values.astype(np.float64) ** 2))
    assert rms == pytest.approx(0.05, rel=0.1)
    assert abs(values.mean()) < 0.2 * rms


def test_encode_k_quant_is_reproducible_and_zero_for_zeros():
    array = np.ones((2, 256), dtype=np.float32)
    assert np.array_equal(encode(array, QType.Q4_K), encode(array, QType.Q4_K))
    zeros = encode(np.zeros((2, 256), dtype=np.float32), QType.Q4_K)
    assert not _reference_dequantize(zeros, QType.Q4_K, (2, 256)).any()


def test_encode_rejects_row_not_multiple_of_block():
    with pytest.raises(ValueError, match="not a multiple"):
        encode(np.zeros((4, 100), dtype=np.float32), QType.Q4_K)


def test_flux_qtype_for_follows_flux_convention():
    rule = flux_qtype_for(QType.Q4_K)
    matrix = np.zeros((256, 512), dtype=np.float32)
    assert rule("double_blocks.0.img_attn.qkv.weight", matrix) == QType.Q4_K
    assert rule("model.diffusion_model.single_blocks.3.linear1.weight", matrix) == QType.Q4_K
    assert rule("single_blocks.3.linear2.weight", np.zeros((256, 100), dtype=np.float32)) == QType.F16
    for name in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.out_layer.weight",
                 "guidance_in.in_layer.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"):
        assert rule(name, matrix) == QType.F16, name
    assert rule("double_blocks.0.img_attn.qkv.bias", np.zeros(512, dtype=np.float32)) == QType.F32
    assert rule("double_blocks.0.img_attn.norm.key_norm.scale", np.zeros(128, dtype=np.float32)) == QType.F32


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_K])
def test_write_gguf_stores_encoded_bytes_and_torch_order_shapes(tmp_path, qtype):
    rng = np.random.default_rng(4)
    tensors = {"a.weight": rng.standard_normal((3, 256)).astype(np.float32),
               "b.bias": rng.standard_normal(7).astype(np.float32)}
    path = tmp_path / "model.gguf"
    write_gguf(path, tensors, lambda name, a: qtype if a.ndim == 2 else QType.F32,
               rng=np.random.default_rng(5), metadata={"demo.seed": 5, "demo.note": "x"})

    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    assert stored["a.weight"].tensor_type == qtype
    assert tuple(reversed(stored["a.weight"].shape.tolist())) == (3, 256)
    expected = encode(tensors["a.weight"], qtype, np.random.default_rng(5))
    assert np.array_equal(np.asarray(stored["a.weight"].data).view(np.uint8).reshape(expected.shape), expected)
    assert np.array_equal(stored["b.bias"].data, tensors["b.bias"])
    assert reader.get_field("general.architecture").contents() == "flux"
    assert reader.get_field("demo.seed").contents() == 5
    assert os.listdir(tmp_path) == ["model.gguf"]


def test_write_gguf_failure_leaves_no_file(tmp_path):
    def broken_rule(name, array):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_gguf(tmp_path / "model.gguf", {"w": np.zeros((2, 32), dtype=np.float32)}, broken_rule)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.Q8_0, QType.Q4_K], ids=lambda t: t.name)
def test_round_trip_through_read_gguf_and_dequantize(tmp_path, qtype):
    array = np.random.default_rng(6).normal(0.0, 0.02, size=(2, 3, 256)).astype(np.float32)
    path = tmp_path / "round-trip.gguf"
    write_gguf(path, {"double_blocks.0.w": array}, lambda name, a: qtype, rng=np.random.default_rng(8))

    tensor = read_gguf(path, expected_arch="flux").tensors["double_blocks.0.w"]
    assert (tensor.qtype, tensor.shape) == (qtype, array.shape)
    ours = dequantize(tensor.data.reshape(-1).view(torch.uint8), tensor.qtype, tensor.shape)
    expected = _reference_dequantize(encode(array, qtype, np.random.default_rng(8)), qtype, array.shape)
    assert torch.equal(ours, torch.from_numpy(expected))
