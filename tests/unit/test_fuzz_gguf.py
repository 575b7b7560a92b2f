"""Fuzzing the GGUF reader (header, metadata, tensor infos, data ranges) and the text-encoder name
mapping with mutations of valid files. Property: a file is either read into tensors that lie inside
it and dequantize, or refused with GGUFFormatError naming the file; within the time and memory
bounds of fuzz_support."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from fuzz_support import PATH_TRICKS, Seeds, bounded, expect_only, fuzz_settings, mutated_bytes
from gguf import GGMLQuantizationType as QType
from hypothesis import example, given
from hypothesis import strategies as st

from lora_ops.dequant import dequantize, quantized_nbytes
from lora_ops.gguf_file import GGUFFormatError, read_gguf, read_text_encoder_gguf, t5_name_from_llama_cpp
from lora_ops.gguf_write import encode

FLUX_TENSORS = {
    "double_blocks.0.img_attn.qkv.weight": ((8, 256), QType.Q4_K),
    "model.diffusion_model.double_blocks.0.img_mlp.0.weight": ((4, 64), QType.Q8_0),
    "single_blocks.0.linear1.weight": ((4, 32), QType.Q5_1),
    "single_blocks.0.linear2.weight": ((4, 32), QType.BF16),
    "img_in.weight": ((8, 16), QType.F16),
    "img_in.bias": ((8,), QType.F32),
    # IQ4 (common in text-encoder files): no quantizer anywhere, so random blocks with a finite scale
    "txt_in.weight": ((2, 256), QType.IQ4_XS),
    "time_in.in_layer.weight": ((2, 64), QType.IQ4_NL),
}
_IQ4 = (QType.IQ4_NL, QType.IQ4_XS)
T5_TENSORS = {
    "token_embd.weight": ((16, 32), QType.Q8_0),
    "enc.blk.0.attn_q.weight": ((32, 32), QType.Q4_0),
    "enc.blk.0.attn_rel_b.weight": ((32, 4), QType.F16),
    "enc.blk.0.ffn_norm.weight": ((32,), QType.F32),
    "enc.output_norm.weight": ((32,), QType.F32),
    "encoder.block.1.layer.0.layer_norm.weight": ((32,), QType.F32),
}


def gguf_bytes(path, tensors: dict, arch: str) -> bytes:
    """A valid GGUF with string, number and array metadata."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_string("general.name", "fuzz seed")
    writer.add_uint32("demo.depth", 1)
    writer.add_float32("demo.scale", 0.5)
    writer.add_array("demo.list", [1, 2, 3])
    writer.add_array("demo.names", ["a", "bc"])
    for name, (shape, qtype) in tensors.items():
        if qtype in _IQ4:
            raw = rng.integers(0, 256, size=gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
            block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
            blocks = raw.reshape(-1, block_bytes)
            blocks[:, :2] = np.array([0.01], np.float16).view(np.uint8)  # each block's fp16 scale d: finite
            writer.add_tensor(name, raw, raw_dtype=qtype)
            continue
        array = rng.standard_normal(shape).astype(np.float32)
        writer.add_tensor(name, encode(array, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def boundaries(path) -> tuple[int, ...]:
    """Byte offsets where a header field, a tensor info or a tensor's data starts or ends."""
    reader = gguf.GGUFReader(str(path))
    points = {0, 4, 8, 16, 24, reader.data_offset, len(path.read_bytes())}
    for field in reader.fields.values():
        points.add(field.offset)
        points.update(field.offset + sum(part.nbytes for part in field.parts[:i]) for i in range(len(field.parts)))
    for tensor in reader.tensors:
        points.update((tensor.field.offset, tensor.data_offset, tensor.data_offset + tensor.n_bytes))
    return tuple(sorted(points))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_fuzz")
    flux, t5 = folder / "flux.gguf", folder / "t5.gguf"
    return Seeds({
        "folder": folder,
        "flux": (gguf_bytes(flux, FLUX_TENSORS, "flux"), boundaries(flux)),
        "t5": (gguf_bytes(t5, T5_TENSORS, "t5encoder"), boundaries(t5)),
    })


def check_read(path, data: bytes) -> None:
    """The property for one file, through both readers."""
    path.write_bytes(data)
    size = max(len(data), 1)
    outcome = bounded(read_gguf, size, path)
    expect_only(outcome, GGUFFormatError, str(path))
    if outcome.error is None:
        for tensor in outcome.result.tensors.values():
            nbytes = tensor.data.numel() * tensor.data.element_size()
            assert nbytes == quantized_nbytes(tensor.qtype, tensor.shape) and nbytes <= len(data)
            if tensor.is_quantized:
                assert dequantize(tensor.data, tensor.qtype, tensor.shape, torch.float32).shape == tensor.shape
            else:
                assert tensor.data.numel() == tensor.nelement()
        del outcome  # drop the memory map before the next write to the same path
    expect_only(bounded(read_text_encoder_gguf, size, path), GGUFFormatError, str(path))


@fuzz_settings(ci_examples=300)
@given(data=st.data(), which=st.sampled_from(("flux", "t5")))
def test_mutated_gguf_is_read_or_refused_with_a_named_error(seeds, data, which):
    valid, points = seeds[which]
    check_read(seeds["folder"] / f"mutant-{which}.gguf", data.draw(mutated_bytes(valid, points)))


@fuzz_settings(ci_examples=50)
@given(st.binary(max_size=256))
@example(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)  # absurd tensor and key counts
def test_random_bytes_are_refused(seeds, raw):
    check_read(seeds["folder"] / "random.gguf", raw)


tensor_names = st.one_of(
    st.sampled_from(PATH_TRICKS),
    st.sampled_from([*FLUX_TENSORS, *T5_TENSORS]),
    st.builds(lambda b, part, kind: f"enc.blk.{b}.{part}.{kind}", st.integers(0, 30),
              st.sampled_from(("attn_q", "attn_k", "attn_o", "ffn_up", "ffn_norm", "bogus")), st.sampled_from(("weight", "bias"))),
    st.text(min_size=1, max_size=40),
)


@fuzz_settings(ci_examples=60)
@given(names=st.lists(tensor_names, min_size=1, max_size=6), arch=st.sampled_from(("flux", "t5encoder", "llama")))
def test_tensor_names_of_any_kind_are_read_or_refused(seeds, names, arch):
    """Path tricks, NUL, look-alikes, very long names and names that collide after mapping."""
    path = seeds["folder"] / "names.gguf"
    tensors = {}
    try:
        writer = gguf.GGUFWriter(str(path), arch=arch)
        for index, name in enumerate(names):
            array = np.full((4, 32), index, dtype=np.float32)
            writer.add_tensor(name, encode(array, QType.Q8_0), raw_dtype=QType.Q8_0)
            tensors[name] = array
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except (ValueError, UnicodeEncodeError):
        return  # the writer itself refuses duplicates and unencodable names
    check_read(path, path.read_bytes())


@fuzz_settings(ci_examples=300)
@given(st.text(max_size=80) | tensor_names)
def test_t5_name_mapping_never_fails_and_is_injective_on_llama_names(name):
    mapped = t5_name_from_llama_cpp(name)
    assert isinstance(mapped, str)
    if mapped != name:  # a renamed tensor lands on a ComfyUI T5 name no other llama name reaches
        assert mapped.startswith(("encoder.", "shared.")) and not name.startswith(("encoder.", "shared."))
        assert t5_name_from_llama_cpp(mapped) == mapped


# --- regressions the fuzzer found ------------------------------------------------------------


def test_metadata_string_that_is_not_utf8_is_refused(seeds):
    """Found by the fuzzer: GGUFReader decoded string values unchecked (UnicodeDecodeError)."""
    valid, _ = seeds["flux"]
    path = seeds["folder"] / "bad-string.gguf"
    path.write_bytes(valid.replace(b"fuzz seed", b"\xff\x00\x00\x00 seed"))
    with pytest.raises(GGUFFormatError, match="metadata 'general.name'.* is not valid UTF-8") as caught:
        read_gguf(path)
    assert str(path) in str(caught.value)
