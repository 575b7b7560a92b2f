"""Fuzzing the LoRA reader and format detection: mutated safetensors files (bytes, header JSON,
shapes, dtypes, offsets, key names). Property: read_lora_file returns finite float tensors no
larger than the file, or raises LoraFormatError naming the file; detection and normalisation of
any key set raise nothing but LoraFormatError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from fuzz_support import PATH_TRICKS, Seeds, bounded, expect_only, fuzz_settings, mutated_bytes
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save

from lora_ops.lora_formats import (
    LoraFormatError,
    describe_format,
    detect_format,
    normalize_flux_lora,
    read_lora_file,
)

KOHYA_KEYS = [
    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
    "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
    "lora_unet_double_blocks_0_img_attn_qkv.alpha",
    "lora_unet_single_blocks_0_linear1.lora_down.weight",
    "lora_unet_single_blocks_0_linear1.lora_up.weight",
]
DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64",
          "BOOL", "C64", "F4", "X", "", None, 5)


def valid_lora() -> bytes:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key in KOHYA_KEYS:
        tensors[key] = torch.tensor(4.0) if key.endswith(".alpha") else torch.randn(4, 8, generator=generator)
    tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"] = tensors[KOHYA_KEYS[4]].to(torch.bfloat16)
    return save(tensors, metadata={"ss_network_dim": "4"})


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + length]), data[8 + length:]


def join(header, body: bytes, raw_header: bytes | None = None) -> bytes:
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def boundaries(data: bytes) -> tuple[int, ...]:
    header, body = split(data)
    start = len(data) - len(body)
    points = {0, 8, start, len(data)}
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry:
            points.update(start + offset for offset in entry["data_offsets"])
    return tuple(sorted(points))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    data = valid_lora()
    return Seeds(folder=tmp_path_factory.mktemp("lora_fuzz"), valid=data, points=boundaries(data))


def check_read(path, data: bytes) -> None:
    path.write_bytes(data)
    outcome = bounded(read_lora_file, max(len(data), 1), path)
    expect_only(outcome, LoraFormatError, str(path))
    if outcome.error is None:
        sd = outcome.result
        assert sum(t.numel() * t.element_size() for t in sd.values()) <= len(data)
        assert all(t.is_floating_point() or k.endswith(".alpha") for k, t in sd.items())
        check_keys(list(sd))


def check_keys(keys: list[str]) -> None:
    assert detect_format(keys) in ("kohya", "diffusers", "xlabs", "bfl", "lycoris", "sdxl", "sd15", "unknown")
    assert isinstance(describe_format(keys), str)
    try:
        normalized = normalize_flux_lora(dict.fromkeys(keys, torch.zeros(1)))
    except LoraFormatError as error:
        assert "normalise to" in str(error)
    else:
        assert len(normalized) == len(set(keys))


@fuzz_settings(ci_examples=200)
@given(data=st.data())
def test_mutated_bytes_are_read_or_refused(seeds, data):
    check_read(seeds["folder"] / "bytes.safetensors", data.draw(mutated_bytes(seeds["valid"], seeds["points"])))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_header(draw, valid: bytes) -> bytes:
    """Structurally edited headers: dtypes, shapes, offsets (overlapping, reversed, past the end),
    key names, metadata, deep or huge JSON, wrong header length."""
    header, body = split(valid)
    keys = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("dtype", "shape", "offsets", "rename", "metadata", "replace_entry",
                                     "deep", "length", "duplicate_key")))
        key = draw(st.sampled_from(keys))
        entry = header.get(key)
        if kind == "dtype" and isinstance(entry, dict):
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(st.lists(st.sampled_from((0, 1, 2, 4, 8, 1 << 31, 1 << 62, -1)) | st.integers(0, 64),
                                           max_size=5))
        elif kind == "offsets" and isinstance(entry, dict):
            other = header[draw(st.sampled_from(keys))]
            entry["data_offsets"] = draw(st.sampled_from((
                other["data_offsets"] if isinstance(other, dict) and "data_offsets" in other else [0, 0],
                [0, len(body) + 8], [16, 8], [0, 1 << 63], [-8, 8], [0], "0-8",
            )))
        elif kind == "rename" and key in header:
            header[draw(st.sampled_from(PATH_TRICKS) | st.text(max_size=30))] = header.pop(key)
            keys = [k for k in header if k != "__metadata__"] or keys
        elif kind == "metadata":
            header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values)
        elif kind == "replace_entry":
            header[key] = draw(json_values)
        elif kind == "deep":
            depth = draw(st.sampled_from((50, 200, 5000, 100_000)))
            return join(None, body, b'{"a":' + b"[" * depth + b"]" * depth + b"}")
        elif kind == "length":
            encoded = json.dumps(header).encode()
            return struct.pack("<Q", draw(st.sampled_from((0, 1, 2, len(encoded) - 1, len(encoded) + 1, 1 << 40)))) \
                + encoded + body
        elif kind == "duplicate_key":
            encoded = json.dumps(header).encode()
            duplicate = json.dumps({key: header[key]}).encode()[1:-1]
            return join(None, body, encoded[:-1] + b"," + duplicate + b"}")
    return join(header, body)


@fuzz_settings(ci_examples=200)
@given(data=st.data())
def test_mutated_headers_are_read_or_refused(seeds, data):
    check_read(seeds["folder"] / "header.safetensors", data.draw(mutated_header(seeds["valid"])))


@fuzz_settings(ci_examples=200)
@given(st.lists(st.sampled_from(KOHYA_KEYS + [
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "base_model.model.transformer_blocks.0.ff.net.2.lora_B.weight",
    "double_blocks.0.processor.qkv_lora1.down.weight", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
    "double_blocks.0.img_attn.qkv.lora_A.weight", "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
    "lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "single_blocks.0.linear1.lokr_w1",
]) | st.sampled_from(PATH_TRICKS) | st.text(max_size=60), max_size=12))
def test_any_key_set_is_detected_and_normalised_or_refused(keys):
    check_keys(keys)


# --- regressions the fuzzer found ------------------------------------------------------------


def test_deeply_nested_header_json_is_refused(seeds):
    """Found by the fuzzer: json.loads raised RecursionError on a header nesting 5,000 arrays."""
    _, body = split(seeds["valid"])
    path = seeds["folder"] / "deep.safetensors"
    path.write_bytes(join(None, body, b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"))
    with pytest.raises(LoraFormatError, match="header is not valid JSON") as caught:
        read_lora_file(path)
    assert str(path) in str(caught.value)
