"""Fuzzing the llama.cpp language-model reader for FLUX.2 text encoders (lora_ops.llm_gguf): the
metadata -> tekken tokenizer parser, the config and tensor-set checks on mutated files, and the
name map. Property: a file or vocabulary either gives a config, a state dict and a tekken JSON
ComfyUI can read, or is refused with GGUFFormatError naming the file; within fuzz_support's bounds."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest
from fuzz_support import Seeds, bounded, expect_only, fuzz_settings, mutated_bytes
from gguf import TokenType
from gguf.vocab import bytes_to_unicode
from hypothesis import given
from hypothesis import strategies as st
from tiny_encoders import TINY_MISTRAL, write_tiny_mistral

from lora_ops.gguf_file import GGUFFormatError, read_gguf
from lora_ops.llm_gguf import comfy_name, llm_config, llm_state_dict, tekken_from_gguf

BYTE_CHARS = "".join(bytes_to_unicode().values())
token_types = st.sampled_from([int(t) for t in TokenType]) | st.integers(-3, 10)
tokens = st.text(alphabet=BYTE_CHARS, min_size=1, max_size=6) | st.text(max_size=6) | st.integers() | st.none()


def vocabulary_size(tokens, types) -> int:
    return sum(len(str(t)) * 4 + 16 for t in tokens) + 8 * len(types)


@fuzz_settings(ci_examples=150)
@given(tokens=st.lists(tokens, max_size=40), types=st.lists(token_types, max_size=40))
def test_any_token_lists_give_a_tekken_json_or_a_named_error(tokens, types):
    outcome = bounded(tekken_from_gguf, vocabulary_size(tokens, types), tokens, types, "vocab.gguf")
    expect_only(outcome, GGUFFormatError, "vocab.gguf")
    if outcome.error is None:
        tekken = json.loads(outcome.result)
        n_special = tekken["config"]["default_num_special_tokens"]
        assert 0 < n_special < len(tokens) == tekken["config"]["default_vocab_size"]
        assert [s["token_str"] for s in tekken["special_tokens"]] == tokens[:n_special]
        assert len(tekken["vocab"]) == len(tokens) - n_special == tekken["config"]["num_vocab_tokens"]


@fuzz_settings(ci_examples=200)
@given(specials=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=8),
       pieces=st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=30))
def test_a_byte_level_vocabulary_round_trips_to_its_bytes(specials, pieces):
    encoder = bytes_to_unicode()
    tokens = specials + ["".join(encoder[b] for b in piece) for piece in pieces]
    types = [int(TokenType.CONTROL)] * len(specials) + [int(TokenType.NORMAL)] * len(pieces)
    tekken = json.loads(bounded(tekken_from_gguf, vocabulary_size(tokens, types), tokens, types).result)
    assert [base64.b64decode(v["token_bytes"]) for v in tekken["vocab"]] == pieces
    assert [v["rank"] for v in tekken["vocab"]] == list(range(len(pieces)))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A small valid Mistral-3 encoder GGUF (30 layers of one head, a tekken vocabulary)."""
    path = tmp_path_factory.mktemp("llm_seed") / "mistral.gguf"
    write_tiny_mistral(path, replace(TINY_MISTRAL, hidden=32, heads=1, kv_heads=1, ffn=32))
    return Seeds(mistral=path.read_bytes())


def load_encoder(path):
    model = read_gguf(path)
    config = llm_config(model, "flux2")
    state = llm_state_dict(model, config, "flux2")
    tekken = tekken_from_gguf(model.metadata.get("tokenizer.ggml.tokens"),
                              model.metadata.get("tokenizer.ggml.token_type"), str(path))
    return config, state, tekken


@fuzz_settings(ci_examples=15)
@given(data=st.data())
def test_mutated_encoder_gguf_loads_or_is_refused_with_a_named_error(seeds, data, tmp_path_factory):
    raw = data.draw(mutated_bytes(seeds["mistral"]))
    path = tmp_path_factory.mktemp("llm_fuzz", numbered=True) / "mutated.gguf"
    path.write_bytes(raw)
    outcome = bounded(load_encoder, len(raw), path)
    expect_only(outcome, GGUFFormatError, str(path))
    if outcome.error is None:
        config, state, _ = outcome.result
        for tensor in state.values():  # what the checks let through lies inside the file
            assert tensor.data.numel() * tensor.data.element_size() <= len(raw)
        assert config.head_dim == 128 and config.layers >= 30


llm_names = st.text(max_size=60) | st.from_regex(r"(blk\.[0-9]{1,3}\.[a-z_]{1,12}|token_embd|output(_norm)?)\.weight",
                                                fullmatch=True)


@fuzz_settings(ci_examples=300)
@given(name=llm_names, other=llm_names)
def test_name_map_is_total_and_injective(name, other):
    mapped = comfy_name(name)
    assert mapped is None or mapped.startswith("model.")
    if mapped is not None and name != other:
        assert comfy_name(other) != mapped  # two file tensors never land on one ComfyUI weight
