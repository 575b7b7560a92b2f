"""Fuzzing the workbench's readers: model files for extraction and baking (float .safetensors
checkpoints and GGUFs, mutated), and the GGUF type names. Property: a file is read into float
tensors of the shapes it announces, or refused with ModelWeightsError naming the file; a type
name is one the pack writes or a QuantizeError; within the time and memory bounds of fuzz_support."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fuzz_support import (
    PATH_TRICKS,
    Seeds,
    bounded,
    expect_only,
    fuzz_settings,
    mutated_bytes,
)
from gguf import GGMLQuantizationType as QType
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save

from lora_ops.ggml_quants import TARGET_NAMES, QuantizeError, target_type
from lora_ops.gguf_write import write_gguf
from lora_ops.model_weights import ModelWeightsError, open_weights

TENSORS = {
    "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (12, 32),
    "model.diffusion_model.double_blocks.0.img_attn.qkv.bias": (12,),
    "single_blocks.0.linear2.weight": (8, 32),
}


def read_all(path) -> dict[str, torch.Tensor]:
    source = open_weights(path)
    return {name: source.tensor(name) for name in source.names()}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights_fuzz")
    g = torch.Generator().manual_seed(0)
    checkpoint = save({k: torch.randn(s, generator=g).to(torch.bfloat16 if len(s) == 1 else torch.float16)
                       for k, s in TENSORS.items()} | {"step": torch.tensor([3])})
    write_gguf(folder / "seed.gguf", {k: np.ones(s, np.float32) for k, s in TENSORS.items()},
               lambda name, a: QType.Q8_0 if a.ndim == 2 else QType.F32)
    header_end = 8 + int.from_bytes(checkpoint[:8], "little")
    return Seeds({"folder": folder, "safetensors": (checkpoint, (0, 8, header_end, len(checkpoint))),
                  "gguf": ((folder / "seed.gguf").read_bytes(), (0, 4, 8, 16, 24))})


def check(path, data: bytes) -> None:
    path.write_bytes(data)
    outcome = bounded(read_all, max(len(data), 1), path)
    expect_only(outcome, ModelWeightsError, str(path))
    if outcome.error is None:
        for name, tensor in outcome.result.items():
            assert tensor.dtype == torch.float32 and tensor.numel() * 2 <= len(data), name


@fuzz_settings(ci_examples=100)
@given(data=st.data(), kind=st.sampled_from(("safetensors", "gguf")))
def test_mutated_model_files_are_read_or_refused_with_a_named_error(seeds, data, kind):
    valid, points = seeds[kind]
    check(seeds["folder"] / f"mutant.{kind}", data.draw(mutated_bytes(valid, points)))


@fuzz_settings(ci_examples=200)
@given(st.one_of(st.sampled_from(TARGET_NAMES), st.sampled_from([t.name for t in QType]),
                 st.sampled_from(PATH_TRICKS), st.text(max_size=20)))
def test_type_names_are_known_or_refused_by_name(name):
    try:
        qtype = target_type(name)
    except QuantizeError as error:
        assert repr(name) in str(error) and name not in TARGET_NAMES
    else:
        assert qtype.name == name
