"""lora_ops.llm_gguf: llama.cpp GGUF language models as FLUX.2 text encoders (names, Q/K layout,
config, checks) and Mistral's tekken tokenizer rebuilt from GGUF metadata."""

from __future__ import annotations

import json
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from tiny_encoders import (
    TINY_MISTRAL,
    TINY_QWEN,
    gguf_tokens_from_tekken,
    hf_weights,
    llama_cpp_tensors,
    metadata,
    q8_matrices,
    quantized_reference,
    tiny_tekken,
    write_tiny_mistral,
)

from lora_ops.dequant import dequantize
from lora_ops.gguf_file import GGUFFormatError, read_gguf
from lora_ops.gguf_write import write_gguf
from lora_ops.llm_gguf import (
    llama_cpp_permute,
    llm_config,
    llm_state_dict,
    tekken_from_gguf,
    unpermute_rows,
    vocabulary_mismatch,
)


def test_llama_cpp_permutation_is_the_known_interleave_and_unpermute_inverts_it():
    # 2 heads of 4 rows: HF keeps each head's rotary halves apart (0 1 | 2 3), llama.cpp interleaves them.
    permuted = llama_cpp_permute(torch.arange(8), 2)
    assert permuted.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permuted[unpermute_rows(8, 2)].tolist() == list(range(8))
    weight = torch.randn(3 * 2 * 5, 7)  # 3 heads, head_dim 10
    assert torch.equal(llama_cpp_permute(weight, 3)[unpermute_rows(30, 3)], weight)
    with pytest.raises(ValueError, match="cannot be split into 4 heads"):
        unpermute_rows(10, 4)


def test_mistral_gguf_maps_to_comfy_names_with_qk_unpermuted_and_still_quantized(tmp_path):
    path = tmp_path / "mistral.gguf"
    cfg = replace(TINY_MISTRAL, layers=30, hidden=64, ffn=64)
    weights = write_tiny_mistral(path, cfg)
    model = read_gguf(path)
    config = llm_config(model, "flux2")
    assert (config.layers, config.hidden, config.heads, config.kv_heads, config.head_dim) == (30, 64, 2, 1, 128)
    assert config.rope_theta == 1e9 and not config.lm_head
    state = llm_state_dict(model, config, "flux2")
    assert set(state) == set(weights)
    reference = quantized_reference(weights)
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.3.mlp.down_proj.weight"):
        tensor = state[name]
        assert tensor.qtype == QType.Q8_0 and tensor.data.dtype == torch.uint8
        values = dequantize(tensor.data, tensor.qtype, tensor.shape, torch.float32)
        assert torch.equal(values, torch.from_numpy(reference[name]))


def test_qwen3_files_are_not_unpermuted(tmp_path):
    cfg = replace(TINY_QWEN, vocab=64)
    weights = hf_weights(cfg)
    path = tmp_path / "qwen.gguf"
    write_gguf(path, llama_cpp_tensors(cfg, weights), q8_matrices, arch="qwen3", metadata=metadata(cfg))
    model = read_gguf(path)
    state = llm_state_dict(model, llm_config(model, "klein"), "klein")
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(dequantize(q.data, q.qtype, q.shape, torch.float32),
                       torch.from_numpy(quantized_reference(weights)["model.layers.0.self_attn.q_proj.weight"]))
    assert "model.layers.0.self_attn.q_norm.weight" in state


def write(tmp_path, cfg, arch=None, drop=(), add=None, meta=None):
    weights = hf_weights(cfg)
    tensors = {k: v for k, v in llama_cpp_tensors(cfg, weights).items() if k not in drop}
    tensors |= add or {}
    path = tmp_path / "model.gguf"
    write_gguf(path, tensors, q8_matrices, arch=arch or cfg.arch, metadata={**metadata(cfg), **(meta or {})})
    return read_gguf(path)


SMALL_QWEN = replace(TINY_QWEN, vocab=64)


@pytest.mark.parametrize(("change", "encoder", "message"), [
    ({"arch": "llama"}, "klein", r"'llama' model; the Qwen3 .* architecture 'qwen3'"),
    ({}, "flux2", r"'qwen3' model; the Mistral-Small .* 'llama' or 'mistral3'"),
    ({"meta": {"qwen3.block_count": 20}}, "klein", r"20 layers; .* layers 9, 18, 27, so it needs at least 27"),
    ({"meta": {"qwen3.attention.head_count": 4}}, "klein", r"attn_q.weight has 256 rows, not qwen3.attention.head_count 4 x head size 128"),
    ({"meta": {"qwen3.attention.head_count": 4, "qwen3.attention.key_length": 64}}, "klein", r"heads of 64; .* uses heads of 128"),
    ({"meta": {"qwen3.embedding_length": 64}}, "klein", r"embedding_length = 64 but token_embd.weight is 32 wide"),
    ({"meta": {"qwen3.attention.head_count": "two"}}, "klein", r"'qwen3.attention.head_count' must be a positive integer"),
])
def test_files_that_do_not_fit_are_refused_naming_what_was_found(tmp_path, change, encoder, message):
    model = write(tmp_path, SMALL_QWEN, **change)
    with pytest.raises(GGUFFormatError, match=message):
        llm_config(model, encoder)


@pytest.mark.parametrize(("change", "message"), [
    ({"drop": ("blk.5.ffn_up.weight",)}, r"tensors are missing .*blk\.5\.ffn_up\.weight"),
    ({"drop": ("blk.2.attn_q_norm.weight",)}, r"missing .*blk\.2\.attn_q_norm\.weight"),
    ({"add": {"rope_freqs.weight": np.ones(64, np.float32)}}, r"does not have: rope_freqs\.weight"),
    ({"add": {"blk.28.attn_norm.weight": np.ones(32, np.float32)}}, r"layer 28 but qwen3.block_count is 28"),
])
def test_tensor_sets_that_do_not_fit_are_refused(tmp_path, change, message):
    model = write(tmp_path, SMALL_QWEN, **change)
    with pytest.raises(GGUFFormatError, match=message):
        llm_state_dict(model, llm_config(model, "klein"), "klein")


def test_qk_norms_on_a_mistral_file_are_refused(tmp_path):
    cfg = replace(TINY_MISTRAL, hidden=32, ffn=64, vocab=64, qk_norm=True)
    model = write(tmp_path, cfg)
    with pytest.raises(GGUFFormatError, match="attn_k_norm, attn_q_norm tensors, which the Mistral"):
        llm_state_dict(model, llm_config(model, "flux2"), "flux2")


def test_tekken_rebuilt_from_gguf_metadata_equals_the_original(tmp_path):
    original = json.loads(tiny_tekken())
    write_tiny_mistral(tmp_path / "m.gguf", replace(TINY_MISTRAL, hidden=32, ffn=64))
    model = read_gguf(tmp_path / "m.gguf")  # the arrays survive the GGUF round trip
    rebuilt = json.loads(tekken_from_gguf(model.metadata["tokenizer.ggml.tokens"],
                                          model.metadata["tokenizer.ggml.token_type"]))
    assert rebuilt["vocab"] == [{"rank": v["rank"], "token_bytes": v["token_bytes"]} for v in original["vocab"]]
    assert rebuilt["special_tokens"] == original["special_tokens"]
    for key in ("default_num_special_tokens", "default_vocab_size", "num_vocab_tokens"):
        assert rebuilt["config"][key] == original["config"][key]


@pytest.mark.parametrize(("tokens", "types", "message"), [
    (["a", "b"], [1], "2 tokens but 1 token types"),
    (["<s>", "a"], [3, 3], "not a tekken vocabulary"),
    (["a", "b"], [1, 1], "not a tekken vocabulary"),
    (["<s>", "a", "<x>"], [3, 1, 3], r"token 2 \('<x>'\) has type 3 after the normal tokens"),
    (["<s>", "a b"], [3, 1], r"token 1 \('a b'\) has ' ', not a byte-level character"),
    (["<s>", ""], [3, 1], "token 1 is empty"),
    (["<s>", 5], [3, 1], "token 1 is not a string"),
    ("tokens", [3], "must be arrays"),
])
def test_tekken_metadata_that_is_not_a_tekken_vocabulary_is_refused(tokens, types, message):
    with pytest.raises(GGUFFormatError, match=message):
        tekken_from_gguf(tokens, types)


def test_gguf_tokens_fixture_matches_gguf_byte_map():
    tokens, types = gguf_tokens_from_tekken(tiny_tekken())
    assert tokens[3] == "[INST]" and types[3] == gguf.TokenType.CONTROL
    assert tokens[20 + ord(" ")] == "Ġ"  # GPT-2's byte-level space, as in real Mistral GGUFs


def test_vocabulary_mismatch_names_the_first_differing_id():
    vocabulary = {"a": 0, "b": 1, "<s>": 2, "late": 9}
    assert vocabulary_mismatch(vocabulary, ["a", "b", "<s>"]) is None
    assert vocabulary_mismatch(vocabulary, None) is None
    assert vocabulary_mismatch(vocabulary, ["a", "x", "<t>"]) == "token 1 is 'x' in the file but 'b' in the tokenizer"
