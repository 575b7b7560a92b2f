"""Tiny FLUX.2 text encoders written as llama.cpp writes them (test fixtures, no comfy import).

Tiny configs of ComfyUI's ``Mistral3Small24B`` (FLUX.2 [dev]) and ``Qwen3_4B`` (klein): the real
head size (ComfyUI fixes 128), few heads, narrow layers, and just enough layers for the hidden
states the encoders read (Mistral 10/20/30, Qwen3 9/18/27). Tensors get llama.cpp's names, Q/K of
the llama-family architectures llama.cpp's permutation, and the metadata keys its converter writes;
Mistral carries a tiny tekken vocabulary in ``tokenizer.ggml.*`` the way gguf's ``MistralVocab`` does.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from lora_ops.gguf_write import write_gguf
from lora_ops.llm_gguf import llama_cpp_permute

QWEN_VOCAB = 151936  # the Qwen2/3 embedding rows: ComfyUI's Qwen tokenizer emits ids up to 151668


@dataclass(frozen=True)
class TinyLLM:
    arch: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    rope_theta: float
    rms_eps: float
    qk_norm: bool
    head_dim: int = 128


# hidden 256: the encoder's output (3 tapped layers, 768 wide) conditions the tiny FLUX.1 model.
TINY_MISTRAL = TinyLLM("mistral3", layers=30, hidden=256, heads=2, kv_heads=1, ffn=512, vocab=0,
                       rope_theta=1e9, rms_eps=1e-5, qk_norm=False)
TINY_QWEN = TinyLLM("qwen3", layers=28, hidden=32, heads=2, kv_heads=1, ffn=64, vocab=QWEN_VOCAB,
                    rope_theta=1e6, rms_eps=1e-6, qk_norm=True)

# Mistral's special tokens at their real ids (the FLUX.2 template uses [INST] 3, [/INST] 4,
# [SYSTEM_PROMPT] 17, [/SYSTEM_PROMPT] 18; ComfyUI pads with 11 and starts with 1).
_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 11: "<pad>",
             17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]"}
_N_SPECIAL = 20
_MERGED = [b"th", b"he", b"the", b" t", b" a", b"in", b"an", b"re", b"on", b" the", b"at", b"en", b"ing"]


def tiny_tekken() -> bytes:
    """A tekken.json in Mistral's format: 20 special tokens, the 256 bytes, a few merged tokens."""
    specials = [{"rank": i, "token_str": _SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True} for i in range(_N_SPECIAL)]
    pieces = [bytes([b]) for b in range(256)] + _MERGED
    vocab = [{"rank": rank, "token_bytes": base64.b64encode(piece).decode("ascii")} for rank, piece in enumerate(pieces)]
    config = {"pattern": "", "num_vocab_tokens": len(vocab), "default_vocab_size": _N_SPECIAL + len(vocab),
              "default_num_special_tokens": _N_SPECIAL, "version": "v7"}
    return json.dumps({"config": config, "vocab": vocab, "special_tokens": specials}).encode("utf-8")


def gguf_tokens_from_tekken(tekken: bytes) -> tuple[list[str], list[int]]:
    """``tokenizer.ggml.tokens`` / ``token_type`` as gguf's ``MistralVocab._tekken_tokens`` writes them."""
    data = json.loads(tekken)
    byte_encoder = gguf.vocab.bytes_to_unicode()
    n_special = data["config"]["default_num_special_tokens"]
    tokens = [s["token_str"] for s in sorted(data["special_tokens"], key=lambda s: s["rank"])]
    types = [int(gguf.TokenType.CONTROL)] * n_special
    for entry in sorted(data["vocab"], key=lambda v: v["rank"]):
        tokens.append("".join(byte_encoder[b] for b in base64.b64decode(entry["token_bytes"])))
        types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def hf_weights(cfg: TinyLLM, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float weights under HF / ComfyUI names (``model.layers.N.self_attn.q_proj.weight`` ...)."""
    rng = np.random.default_rng(seed)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(width):
        return (1.0 + 0.1 * rng.standard_normal(width)).astype(np.float32)

    q_rows, kv_rows = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": rng.standard_normal((cfg.vocab, cfg.hidden)).astype(np.float32)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": norm(cfg.hidden),
            p + "self_attn.q_proj.weight": matrix(q_rows, cfg.hidden),
            p + "self_attn.k_proj.weight": matrix(kv_rows, cfg.hidden),
            p + "self_attn.v_proj.weight": matrix(kv_rows, cfg.hidden),
            p + "self_attn.o_proj.weight": matrix(cfg.hidden, q_rows),
            p + "post_attention_layernorm.weight": norm(cfg.hidden),
            p + "mlp.gate_proj.weight": matrix(cfg.ffn, cfg.hidden),
            p + "mlp.up_proj.weight": matrix(cfg.ffn, cfg.hidden),
            p + "mlp.down_proj.weight": matrix(cfg.hidden, cfg.ffn),
        }
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = norm(cfg.head_dim)
            out[p + "self_attn.k_norm.weight"] = norm(cfg.head_dim)
    out["model.norm.weight"] = norm(cfg.hidden)
    return out


_LLAMA_CPP_PARTS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_tensors(cfg: TinyLLM, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names -> llama.cpp names; Q/K permuted for llama / mistral3 as convert_hf_to_gguf.py does."""
    import torch

    out = {}
    for name, array in weights.items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = array
        elif name == "model.norm.weight":
            out["output_norm.weight"] = array
        else:
            layer, part = name[len("model.layers."):-len(".weight")].split(".", 1)
            short = _LLAMA_CPP_PARTS[part]
            if cfg.arch in ("llama", "mistral3") and short in ("attn_q", "attn_k"):
                n_head = cfg.heads if short == "attn_q" else cfg.kv_heads
                array = llama_cpp_permute(torch.from_numpy(array), n_head).numpy()
            out[f"blk.{layer}.{short}.weight"] = array
    return out


def metadata(cfg: TinyLLM, tokens: tuple[list[str], list[int]] | None = None, pre: str = "tekken") -> dict:
    a = cfg.arch
    meta = {
        f"{a}.block_count": cfg.layers, f"{a}.context_length": 4096, f"{a}.embedding_length": cfg.hidden,
        f"{a}.feed_forward_length": cfg.ffn, f"{a}.attention.head_count": cfg.heads,
        f"{a}.attention.head_count_kv": cfg.kv_heads, f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim, f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_eps,
        f"{a}.rope.freq_base": cfg.rope_theta, "general.name": f"tiny {a}",
    }
    if tokens is not None:
        meta |= {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                 "tokenizer.ggml.tokens": tokens[0], "tokenizer.ggml.token_type": tokens[1]}
    return meta


def q8_matrices(name: str, array: np.ndarray) -> QType:
    """What llama.cpp's Q8_0 files do: matrices Q8_0, norms F32."""
    return QType.Q8_0 if array.ndim == 2 and array.shape[1] % 32 == 0 else QType.F32


def write_tiny_mistral(path, cfg: TinyLLM = TINY_MISTRAL, seed: int = 0, qtype_for=q8_matrices) -> dict[str, np.ndarray]:
    """The tiny Mistral-3 encoder GGUF with its tekken vocabulary; returns the HF-named float weights."""
    tokens = gguf_tokens_from_tekken(tiny_tekken())
    cfg = TinyLLM(**{**cfg.__dict__, "vocab": len(tokens[0])})
    weights = hf_weights(cfg, seed)
    write_gguf(path, llama_cpp_tensors(cfg, weights), qtype_for, arch=cfg.arch, metadata=metadata(cfg, tokens))
    return weights


def write_tiny_qwen(path, cfg: TinyLLM = TINY_QWEN, seed: int = 1, qtype_for=q8_matrices,
                    vocabulary: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The tiny Qwen3 encoder GGUF; returns the HF-named float weights. The tokenizer comes from
    ComfyUI; with ``vocabulary`` (token -> id, e.g. ComfyUI's Qwen tokenizer's) the file also
    carries it as ``tokenizer.ggml.tokens``, as real Qwen3 GGUFs do (specials as CONTROL)."""
    weights = hf_weights(cfg, seed)
    tokens = None
    if vocabulary is not None:
        by_id = sorted(vocabulary.items(), key=lambda item: item[1])
        assert [i for _, i in by_id] == list(range(len(by_id)))
        tokens = ([t for t, _ in by_id], [int(gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL)
                                          for t, _ in by_id])
    write_gguf(path, llama_cpp_tensors(cfg, weights), qtype_for, arch=cfg.arch, metadata=metadata(cfg, tokens, "qwen2"))
    return weights


def quantized_reference(weights: dict[str, np.ndarray], qtype_for=q8_matrices) -> dict[str, np.ndarray]:
    """Each HF-layout weight quantized and dequantized by the gguf package: what the GGUF holds,
    un-permuted by construction (rows move whole, so permuting commutes with block quantization)."""
    out = {}
    for name, array in weights.items():
        qtype = qtype_for(name, array)
        out[name] = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype).astype(np.float32)
    return out


# --- T5 alone (Chroma) ------------------------------------------------------------------------------
# ComfyUI recognises T5-XXL by 24 blocks whose gated FFN is 10240 wide: a tiny T5 keeps those and
# shrinks the width (d_model 32, 2 heads of 16). T5's tokenizer (from ComfyUI) has 32128 ids.
TINY_T5 = {"d_model": 32, "d_ff": 10240, "num_layers": 24, "num_heads": 2, "d_kv": 16, "vocab_size": 32128}

_T5_LLAMA_CPP = {
    "layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k", "layer.0.SelfAttention.v": "attn_v",
    "layer.0.SelfAttention.o": "attn_o", "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
    "layer.0.layer_norm": "attn_norm", "layer.1.DenseReluDense.wi_0": "ffn_gate",
    "layer.1.DenseReluDense.wi_1": "ffn_up", "layer.1.DenseReluDense.wo": "ffn_down", "layer.1.layer_norm": "ffn_norm",
}


def write_tiny_t5(path, seed: int = 2) -> None:
    """A tiny T5 encoder GGUF with llama.cpp's names (``enc.blk.N.attn_q`` ...) and ``t5encoder`` metadata."""
    rng = np.random.default_rng(seed)
    c = TINY_T5
    inner = c["num_heads"] * c["d_kv"]

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(c["d_model"])).astype(np.float32)

    hf = {"shared.weight": rng.standard_normal((c["vocab_size"], c["d_model"])).astype(np.float32)}
    for i in range(c["num_layers"]):
        p = f"encoder.block.{i}."
        hf |= {p + "layer.0.SelfAttention.q.weight": matrix(inner, c["d_model"]),
               p + "layer.0.SelfAttention.k.weight": matrix(inner, c["d_model"]),
               p + "layer.0.SelfAttention.v.weight": matrix(inner, c["d_model"]),
               p + "layer.0.SelfAttention.o.weight": matrix(c["d_model"], inner),
               p + "layer.0.layer_norm.weight": norm(),
               p + "layer.1.DenseReluDense.wi_0.weight": matrix(c["d_ff"], c["d_model"]),
               p + "layer.1.DenseReluDense.wi_1.weight": matrix(c["d_ff"], c["d_model"]),
               p + "layer.1.DenseReluDense.wo.weight": matrix(c["d_model"], c["d_ff"]),
               p + "layer.1.layer_norm.weight": norm()}
    hf["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = rng.standard_normal((32, c["num_heads"])).astype(np.float32)
    hf["encoder.final_layer_norm.weight"] = norm()

    tensors = {}
    for name, array in hf.items():
        if name == "shared.weight":
            tensors["token_embd.weight"] = array
        elif name == "encoder.final_layer_norm.weight":
            tensors["enc.output_norm.weight"] = array
        else:
            block, part = name[len("encoder.block."):-len(".weight")].split(".", 1)
            tensors[f"enc.blk.{block}.{_T5_LLAMA_CPP[part]}.weight"] = array
    a = "t5encoder"
    meta = {f"{a}.context_length": 512, f"{a}.embedding_length": c["d_model"], f"{a}.feed_forward_length": c["d_ff"],
            f"{a}.block_count": c["num_layers"], f"{a}.attention.head_count": c["num_heads"],
            f"{a}.attention.key_length": c["d_kv"], f"{a}.attention.value_length": c["d_kv"],
            f"{a}.attention.layer_norm_epsilon": 1e-6, f"{a}.attention.relative_buckets_count": 32}
    write_gguf(path, tensors, q8_matrices, arch=a, metadata=meta)
