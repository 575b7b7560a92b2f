import json
import os
import struct
import tracemalloc
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from lora_ops.dequant import dequantize
from lora_ops.gguf_file import (
    GGUFFormatError,
    QTensor,
    read_gguf,
    read_text_encoder_gguf,
    t5_name_from_llama_cpp,
)
from lora_ops.gguf_write import encode, write_gguf

FLUX_TYPES = {
    "double_blocks.0.img_attn.qkv.weight": ((96, 256), QType.Q4_K),
    "double_blocks.0.img_mlp.0.weight": ((64, 64), QType.Q8_0),
    "single_blocks.0.linear1.weight": ((32, 64), QType.BF16),
    "img_in.weight": ((64, 16), QType.F16),
    "img_in.bias": ((64,), QType.F32),
}


def flux_tensors(prefix: str = "") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {prefix + name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in FLUX_TYPES.items()}


def qtype_by_name(name: str, array: np.ndarray) -> QType:
    return FLUX_TYPES[name.removeprefix("model.diffusion_model.")][1]


@pytest.fixture
def flux_path(tmp_path):
    path = tmp_path / "tiny-flux.gguf"
    write_gguf(path, flux_tensors(), qtype_by_name, metadata={"demo.depth": 1, "demo.name": "tiny"})
    return path


def tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset of n_dims in the tensor info of `name` (just after its length-prefixed name)."""
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def patched(path, offset: int, fmt: str, value) -> bytes:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return bytes(data)


def assert_format_error(path, *fragments: str, **kwargs) -> GGUFFormatError:
    with pytest.raises(GGUFFormatError) as caught:
        read_gguf(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


# --- reading valid files ---------------------------------------------------------------------


def test_read_gguf_gives_torch_order_shapes_types_and_metadata(flux_path):
    model = read_gguf(flux_path, expected_arch="flux")
    assert model.arch == "flux" and model.path == str(flux_path)
    assert set(model.tensors) == set(FLUX_TYPES)
    for name, (shape, qtype) in FLUX_TYPES.items():
        tensor = model.tensors[name]
        assert isinstance(tensor, QTensor)
        assert (tensor.name, tensor.qtype, tensor.shape) == (name, qtype, shape)
    qkv = model.tensors["double_blocks.0.img_attn.qkv.weight"]
    assert qkv.is_quantized and qkv.data.dtype == torch.uint8 and qkv.data.shape == (96, 144)
    assert model.metadata["demo.depth"] == 1 and model.metadata["demo.name"] == "tiny"
    assert model.metadata["general.architecture"] == "flux"


def test_float_tensors_are_float_tensors_with_the_stored_values(flux_path):
    model = read_gguf(flux_path)
    source = flux_tensors()
    bias = model.tensors["img_in.bias"]
    assert not bias.is_quantized and torch.equal(bias.data, torch.from_numpy(source["img_in.bias"]))
    half = model.tensors["img_in.weight"]
    assert half.data.dtype == torch.float16 and half.data.shape == (64, 16)
    assert torch.equal(half.data, torch.from_numpy(source["img_in.weight"]).half())
    brain = model.tensors["single_blocks.0.linear1.weight"]
    assert not brain.is_quantized and brain.data.dtype == torch.bfloat16 and brain.data.shape == (32, 64)
    torch.testing.assert_close(brain.data.float(), torch.from_numpy(source["single_blocks.0.linear1.weight"]),
                               rtol=1e-2, atol=0)


def test_quantized_data_is_a_view_of_the_file_not_a_copy(flux_path):
    model = read_gguf(flux_path)
    qkv = model.tensors["double_blocks.0.img_attn.qkv.weight"]
    before = qkv.data[0, 100].clone()
    raw = flux_path.read_bytes()
    expected_bytes = encode(flux_tensors()["double_blocks.0.img_attn.qkv.weight"], QType.Q4_K,
                            np.random.default_rng(0)).tobytes()
    position = raw.index(expected_bytes) + 100
    with open(flux_path, "r+b") as file:  # the mapping is shared: a write shows through
        file.seek(position)
        file.write(bytes([int(before) ^ 0xFF]))
    assert int(qkv.data[0, 100]) == int(before) ^ 0xFF


def test_reading_emits_no_warnings(flux_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = read_gguf(flux_path)
        dequantize(model.tensors["double_blocks.0.img_mlp.0.weight"].data, QType.Q8_0, (64, 64))


def test_flux_prefix_is_stripped(tmp_path):
    path = tmp_path / "prefixed.gguf"
    write_gguf(path, flux_tensors("model.diffusion_model."), qtype_by_name)
    assert set(read_gguf(path, expected_arch="flux").tensors) == set(FLUX_TYPES)


@pytest.mark.parametrize("arch, described", [("llama", "a 'llama' model"), ("sdxl", "a 'sdxl' model")])
def test_other_architectures_are_refused(tmp_path, arch, described):
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, {"blk.0.attn_q.weight": np.ones((32, 32), np.float32)}, lambda n, a: QType.F16, arch=arch)
    assert_format_error(path, described, "expected a 'flux' model", expected_arch="flux")
    assert read_gguf(path).arch == arch


# --- malformed files -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut_at, problem",
    [(10, "shorter than the 24-byte GGUF header"), ("infos", "file truncated"), ("data", "past the end")],
)
def test_truncated_files(flux_path, cut_at, problem):
    data = flux_path.read_bytes()
    if cut_at == "infos":
        cut_at = tensor_info_offset(data, "img_in.weight") + 6
    elif cut_at == "data":
        cut_at = len(data) - 1000
    flux_path.write_bytes(data[:cut_at])
    assert_format_error(flux_path, problem)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_format_error(path, "not a GGUF file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_format_error(path, "empty")


def test_wrong_magic(flux_path):
    patched(flux_path, 0, "<4s", b"GGML")
    assert_format_error(flux_path, "not a GGUF file", "b'GGML'")


def test_unsupported_version(flux_path):
    patched(flux_path, 4, "<I", 7)
    assert_format_error(flux_path, "unsupported GGUF version 7")


def test_tensor_byte_size_not_matching_shape_and_type(tmp_path):
    # The bytes hold 4 rows of Q8_0 while the header claims 8: the file is too short for it.
    path = tmp_path / "short-tensor.gguf"
    writer = gguf.GGUFWriter(path, arch="flux")
    writer.add_tensor("double_blocks.0.x.weight", encode(np.ones((4, 64), np.float32), QType.Q8_0),
                      raw_shape=(8, 68), raw_dtype=QType.Q8_0)  # byte shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_format_error(path, "'double_blocks.0.x.weight'", "Q8_0", "(8, 64)", "size does not match shape and type")


def test_tensor_overlapping_the_next_one(flux_path):
    data = flux_path.read_bytes()
    # img_mlp (Q8_0, 64 x 64) claims 128 rows: its bytes would run into the following tensor.
    patched(flux_path, tensor_info_offset(data, "double_blocks.0.img_mlp.0.weight") + 4 + 8, "<Q", 128)
    assert_format_error(flux_path, "'double_blocks.0.img_mlp.0.weight'", "starts", "size does not match")


@pytest.mark.parametrize("type_id, problem", [(99, "unknown quant type id 99"), (int(QType.IQ2_XXS), "IQ2_XXS")])
def test_unknown_or_unsupported_quant_type(flux_path, type_id, problem):
    data = flux_path.read_bytes()
    type_at = tensor_info_offset(data, "double_blocks.0.img_attn.qkv.weight") + 4 + 2 * 8
    assert struct.unpack_from("<I", data, type_at)[0] == QType.Q4_K
    patched(flux_path, type_at, "<I", type_id)
    assert_format_error(flux_path, "'double_blocks.0.img_attn.qkv.weight'", problem)


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_dimension_count(flux_path, n_dims):
    patched(flux_path, tensor_info_offset(flux_path.read_bytes(), "img_in.weight"), "<I", n_dims)
    assert_format_error(flux_path, "'img_in.weight'", f"{n_dims} dimensions")


def test_zero_dimension(flux_path):
    patched(flux_path, tensor_info_offset(flux_path.read_bytes(), "img_in.weight") + 4, "<Q", 0)
    assert_format_error(flux_path, "'img_in.weight'", "empty dimension")


def test_row_not_a_multiple_of_the_block(flux_path):
    patched(flux_path, tensor_info_offset(flux_path.read_bytes(), "double_blocks.0.img_mlp.0.weight") + 4, "<Q", 40)
    assert_format_error(flux_path, "'double_blocks.0.img_mlp.0.weight'", "not a multiple of the Q8_0 block size")


def _peak_traced_bytes(action) -> int:
    tracemalloc.start()
    try:
        action()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_absurd_tensor_count_fails_fast_and_small(flux_path):
    patched(flux_path, 8, "<Q", 2**60)
    peak = _peak_traced_bytes(lambda: assert_format_error(flux_path, "claims 1152921504606846976 tensors"))
    assert peak < 1 << 20


def test_absurd_dims_fail_fast_and_small(flux_path):
    dims_at = tensor_info_offset(flux_path.read_bytes(), "img_in.weight") + 4
    patched(flux_path, dims_at, "<Q", 2**40)
    patched(flux_path, dims_at + 8, "<Q", 2**40)
    peak = _peak_traced_bytes(lambda: assert_format_error(flux_path, "'img_in.weight'", "past the end"))
    assert peak < 1 << 20


def test_absurd_metadata_array_length_fails_fast_and_small(tmp_path):
    # gguf.GGUFReader alone loops over a claimed uint8 array length the file cannot hold,
    # growing until MemoryError (seen: 1 GiB in 8 s).
    path = tmp_path / "array.gguf"
    writer = gguf.GGUFWriter(path, arch="flux")
    writer.add_key_value("demo.values", [1, 2, 3], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    writer.add_tensor("img_in.bias", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    key = b"demo.values"
    count_at = path.read_bytes().index(key) + len(key) + 4 + 4
    patched(path, count_at, "<Q", 2**40)
    peak = _peak_traced_bytes(lambda: assert_format_error(path, "'demo.values'", "claims 1099511627776 items"))
    assert peak < 1 << 20


# --- text encoders ---------------------------------------------------------------------------

T5_BLOCK_PARTS = ["attn_q", "attn_k", "attn_v", "attn_o", "attn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm"]


def tiny_llama_cpp_t5(path, n_blocks: int = 24, dim: int = 32) -> None:
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((64, dim)), "enc.output_norm.weight": np.ones(dim)}
    for block in range(n_blocks):
        for part in T5_BLOCK_PARTS:
            shape = (dim,) if part.endswith("norm") else (dim, dim)
            tensors[f"enc.blk.{block}.{part}.weight"] = rng.standard_normal(shape)
    tensors["enc.blk.0.attn_rel_b.weight"] = rng.standard_normal((32, 4))
    # A full T5 GGUF also carries the decoder, which an encoder-only consumer ignores.
    tensors["dec.blk.0.attn_q.weight"] = rng.standard_normal((dim, dim))
    write_gguf(path, tensors, lambda n, a: QType.Q8_0 if a.shape[-1] % 32 == 0 else QType.F32, arch="t5")


def comfyui_t5_xxl_keys() -> set[str]:
    """Every key of ComfyUI's own T5-XXL (the suite's ComfyUI: see tests/conftest.py)."""
    import comfy.ops
    import comfy.text_encoders.t5 as comfy_t5

    with open(os.path.join(os.path.dirname(comfy_t5.__file__), "t5_config_xxl.json")) as config_file:
        config = json.load(config_file)
    model = comfy_t5.T5(config, torch.float16, "meta", comfy.ops.manual_cast)
    return set(model.state_dict())


def test_llama_cpp_t5_names_map_onto_comfyui_t5_xxl(tmp_path, models_dir):
    path = tmp_path / "t5.gguf"
    tiny_llama_cpp_t5(path)
    mapped = read_text_encoder_gguf(path)
    expected = comfyui_t5_xxl_keys()
    assert set(mapped) - {"dec.blk.0.attn_q.weight"} == expected
    q = mapped["encoder.block.3.layer.0.SelfAttention.q.weight"]
    assert q.name == "encoder.block.3.layer.0.SelfAttention.q.weight" and q.qtype == QType.Q8_0


@pytest.mark.parametrize("llama_cpp, comfyui", [
    ("token_embd.weight", "shared.weight"),
    ("enc.output_norm.weight", "encoder.final_layer_norm.weight"),
    ("enc.blk.0.attn_rel_b.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("enc.blk.7.attn_q.weight", "encoder.block.7.layer.0.SelfAttention.q.weight"),
    ("enc.blk.7.attn_k.weight", "encoder.block.7.layer.0.SelfAttention.k.weight"),
    ("enc.blk.7.attn_v.weight", "encoder.block.7.layer.0.SelfAttention.v.weight"),
    ("enc.blk.7.attn_o.weight", "encoder.block.7.layer.0.SelfAttention.o.weight"),
    ("enc.blk.7.attn_norm.weight", "encoder.block.7.layer.0.layer_norm.weight"),
    ("enc.blk.23.ffn_gate.weight", "encoder.block.23.layer.1.DenseReluDense.wi_0.weight"),
    ("enc.blk.23.ffn_up.weight", "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"),
    ("enc.blk.23.ffn_down.weight", "encoder.block.23.layer.1.DenseReluDense.wo.weight"),
    ("enc.blk.23.ffn_norm.weight", "encoder.block.23.layer.1.layer_norm.weight"),
    ("dec.blk.0.attn_q.weight", "dec.blk.0.attn_q.weight"),
])
def test_t5_name_mapping(llama_cpp, comfyui):
    assert t5_name_from_llama_cpp(llama_cpp) == comfyui


def test_hf_named_text_encoder_passes_through(tmp_path):
    path = tmp_path / "clip-l.gguf"
    names = ["text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight",
             "encoder.block.0.layer.0.SelfAttention.q.weight"]
    write_gguf(path, {n: np.ones((8, 32), np.float32) for n in names}, lambda n, a: QType.F16, arch="clip")
    assert set(read_text_encoder_gguf(path)) == set(names)


def test_diffusion_model_is_not_a_text_encoder(flux_path):
    with pytest.raises(GGUFFormatError, match="'flux' diffusion model, not a text encoder") as caught:
        read_text_encoder_gguf(flux_path)
    assert str(flux_path) in str(caught.value)
