"""llama.cpp GGUF language models as FLUX.2 text encoders: names, Q/K layout, config, tokenizer.

FLUX.2 [dev] encodes prompts with Mistral-Small 3.x (24 B), FLUX.2 [klein] with Qwen3 4B/8B.
Users have them as llama.cpp GGUF files (``blk.N.attn_q`` ... ``token_embd``, ``output_norm``).
This module turns such a file into what ComfyUI's own encoder classes load
(``comfy/text_encoders/llama.py`` names, HF Q/K layout), keeping quantized tensors quantized,
and rebuilds Mistral's tekken tokenizer from the file's metadata. Pure torch/gguf: no comfy.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass

import torch
from gguf import TokenType
from gguf.vocab import bytes_to_unicode

from .flux_family import TEXT_ENCODERS
from .gguf_file import GGUFFormatError, GGUFModel, QTensor

# llama.cpp stores Q/K of these architectures in Meta's interleaved rotary layout (its converter
# permutes HF checkpoints); ComfyUI's Llama expects HF's half-split layout. Qwen3 files are not permuted.
PERMUTED_ARCHES = frozenset({"llama", "mistral3"})
# ComfyUI's Llama configs fix head_dim (a class attribute, not a config field).
COMFY_HEAD_DIM = 128

_BLOCK_PARTS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "model.lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True)
class LLMConfig:
    arch: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    context: int
    lm_head: bool

    def comfy_config(self) -> dict:
        """The fields of ComfyUI's Llama config dataclasses (``Qwen3_4BConfig`` ...) the file fixes."""
        return {
            "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "rms_norm_eps": self.rms_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context,
        }


def llama_cpp_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): HF half-split rows -> interleaved."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rows(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes ``llama_cpp_permute``: ``permuted[unpermute_rows(...)] == original``.

    Rows only move whole, so the same index works on a quantized tensor's bytes (GGUF blocks run
    along a row): the weight stays quantized."""
    if n_head < 1 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    # permuted row (h, i, j) holds original row (h, j, i); invert by reading the permuted rows in original order.
    return torch.arange(rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(rows)


def _meta_int(model: GGUFModel, key: str, required: bool = True) -> int | None:
    value = model.metadata.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        found = "missing" if value is None else f"{value!r}"
        raise GGUFFormatError(f"{model.path}: metadata {key!r} must be a positive integer, found {found}")
    return value


def _meta_float(model: GGUFModel, key: str, default: float) -> float:
    value = model.metadata.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise GGUFFormatError(f"{model.path}: metadata {key!r} must be a positive number, found {value!r}")
    return float(value)


def llm_config(model: GGUFModel, encoder: str) -> LLMConfig:
    """The file's model config, checked against what ComfyUI's ``encoder`` class can run."""
    spec = TEXT_ENCODERS[encoder]
    if model.arch not in spec.arches:
        found = f"a {model.arch!r} model" if model.arch else "a file without general.architecture"
        raise GGUFFormatError(
            f"{model.path}: this is {found}; the {spec.label} text encoder must be a llama.cpp GGUF of "
            f"architecture {' or '.join(repr(a) for a in spec.arches)}")
    arch = model.arch
    layers = _meta_int(model, f"{arch}.block_count")
    heads = _meta_int(model, f"{arch}.attention.head_count")
    kv_heads = _meta_int(model, f"{arch}.attention.head_count_kv", required=False) or heads
    embed = model.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise GGUFFormatError(f"{model.path}: no 2-D tensor 'token_embd.weight' (the token embedding)")
    vocab, hidden = embed.shape
    declared_hidden = _meta_int(model, f"{arch}.embedding_length")
    if declared_hidden != hidden:
        raise GGUFFormatError(f"{model.path}: metadata {arch}.embedding_length = {declared_hidden} but "
                              f"token_embd.weight is {hidden} wide")
    q = model.tensors.get("blk.0.attn_q.weight")
    if q is None:
        raise GGUFFormatError(f"{model.path}: no tensor 'blk.0.attn_q.weight'")
    head_dim = _meta_int(model, f"{arch}.attention.key_length", required=False) or q.shape[0] // heads
    if q.shape[0] != heads * head_dim:
        raise GGUFFormatError(f"{model.path}: blk.0.attn_q.weight has {q.shape[0]} rows, not "
                              f"{arch}.attention.head_count {heads} x head size {head_dim}")
    if head_dim != COMFY_HEAD_DIM:
        raise GGUFFormatError(f"{model.path}: attention heads of {head_dim}; ComfyUI's {spec.label} encoder "
                              f"uses heads of {COMFY_HEAD_DIM}")
    if layers < max(spec.taps):
        raise GGUFFormatError(
            f"{model.path}: {layers} layers; the {spec.label} encoder reads the hidden states of layers "
            f"{', '.join(map(str, spec.taps))}, so it needs at least {max(spec.taps)} (the full model has {spec.full_layers})")
    return LLMConfig(
        arch=arch, layers=layers, hidden=hidden, ffn=_meta_int(model, f"{arch}.feed_forward_length"),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab,
        rms_eps=_meta_float(model, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=_meta_float(model, f"{arch}.rope.freq_base", 10000.0),
        context=_meta_int(model, f"{arch}.context_length", required=False) or 4096,
        lm_head="output.weight" in model.tensors,
    )


def comfy_name(name: str) -> str | None:
    """ComfyUI's name for a llama.cpp tensor name, None for names an encoder does not have."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _BLOCK.fullmatch(name)
    if match and match.group(2) in _BLOCK_PARTS:
        return f"model.layers.{match.group(1)}.{_BLOCK_PARTS[match.group(2)]}.weight"
    return None


def llm_state_dict(model: GGUFModel, config: LLMConfig, encoder: str) -> dict[str, QTensor]:
    """The file's tensors under ComfyUI's names, Q/K back in HF layout, quantized ones still quantized.

    Every layer must have exactly the parts ComfyUI's ``encoder`` class has: a missing tensor
    would stay uninitialised there, an extra one (q/k norms on Mistral) would be dropped silently."""
    spec = TEXT_ENCODERS[encoder]
    unknown = sorted(name for name in model.tensors if comfy_name(name) is None)
    if unknown:
        raise GGUFFormatError(f"{model.path}: tensors a {config.arch!r} text encoder does not have: {', '.join(unknown[:8])}"
                              + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    parts = set(_BLOCK_PARTS) if spec.qk_norm else set(_BLOCK_PARTS) - {"attn_q_norm", "attn_k_norm"}
    missing = [f"blk.{i}.{part}.weight" for i in range(config.layers) for part in sorted(parts)
               if f"blk.{i}.{part}.weight" not in model.tensors]
    if missing:
        raise GGUFFormatError(f"{model.path}: {config.arch}.block_count is {config.layers} but tensors are missing "
                              f"for the {spec.label} encoder: {', '.join(missing[:8])}")
    blocks = [match for match in map(_BLOCK.fullmatch, model.tensors) if match]
    extra = sorted({int(m.group(1)) for m in blocks if int(m.group(1)) >= config.layers})
    if extra:
        raise GGUFFormatError(f"{model.path}: tensors of layer {extra[0]} but {config.arch}.block_count is {config.layers}")
    foreign = sorted({m.group(2) for m in blocks} - parts)
    if foreign:
        raise GGUFFormatError(f"{model.path}: {', '.join(foreign)} tensors, which the {spec.label} encoder does not have")
    state = {}
    for name, tensor in model.tensors.items():
        data = tensor.data
        part = _BLOCK.fullmatch(name)
        if part and part.group(2) in ("attn_q", "attn_k") and config.arch in PERMUTED_ARCHES:
            n_head = config.heads if part.group(2) == "attn_q" else config.kv_heads
            try:
                data = data[unpermute_rows(tensor.shape[0], n_head)]
            except ValueError as exc:
                raise GGUFFormatError(f"{model.path}: tensor {name!r} of shape {tensor.shape}: {exc}") from None
        new_name = comfy_name(name)
        state[new_name] = QTensor(new_name, tensor.qtype, tensor.shape, data)
    return state


def tekken_from_gguf(tokens: list[str], token_types: list[int], source: str = "file") -> bytes:
    """Mistral's tekken tokenizer JSON, rebuilt from llama.cpp's ``tokenizer.ggml.tokens`` / ``token_type``.

    llama.cpp writes a tekken vocabulary (gguf ``MistralVocab``) as the special tokens first, as
    CONTROL, then the BPE tokens in rank order as byte-level unicode strings (GPT-2's byte map).
    The JSON has the fields ComfyUI's Mistral tokenizer reads (``from_tekken_json`` in 0.33,
    transformers' ``MistralConverter`` in 0.3.75); tekken's merges follow from the ranks."""
    if not isinstance(tokens, list) or not isinstance(token_types, list):
        raise GGUFFormatError(f"{source}: tokenizer.ggml.tokens and tokenizer.ggml.token_type must be arrays")
    if len(tokens) != len(token_types):
        raise GGUFFormatError(f"{source}: {len(tokens)} tokens but {len(token_types)} token types")
    normal = int(TokenType.NORMAL)
    n_special = next((i for i, kind in enumerate(token_types) if kind == normal), len(tokens))
    if n_special == 0 or n_special == len(tokens):
        raise GGUFFormatError(f"{source}: not a tekken vocabulary (it needs special tokens first, then normal ones; "
                              f"found {n_special} special of {len(tokens)})")
    decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab, specials = [], []
    for token_id, (token, kind) in enumerate(zip(tokens, token_types)):
        if not isinstance(token, str) or isinstance(kind, bool) or not isinstance(kind, int):
            raise GGUFFormatError(f"{source}: token {token_id} is not a string with an integer type")
        if token_id < n_special:
            specials.append({"rank": token_id, "token_str": token, "is_control": True})
            continue
        if kind != normal:
            raise GGUFFormatError(f"{source}: token {token_id} ({token!r}) has type {kind} after the normal tokens "
                                  f"began at {n_special}; a tekken vocabulary keeps its special tokens first")
        try:
            raw = bytes(decoder[char] for char in token)
        except KeyError as exc:
            raise GGUFFormatError(f"{source}: token {token_id} ({token!r}) has {exc.args[0]!r}, not a byte-level "
                                  "character (is this a GPT-2-style byte-level vocabulary?)") from None
        if not raw:
            raise GGUFFormatError(f"{source}: token {token_id} is empty")
        vocab.append({"rank": token_id - n_special, "token_bytes": base64.b64encode(raw).decode("ascii")})
    tekken = {
        "config": {"default_num_special_tokens": n_special, "default_vocab_size": len(tokens),
                   "num_vocab_tokens": len(vocab)},
        "vocab": vocab,
        "special_tokens": specials,
    }
    return json.dumps(tekken).encode("utf-8")



def vocabulary_mismatch(vocabulary: dict[str, int], file_tokens: object) -> str | None:
    """Where a tokenizer's vocabulary (token -> id) disagrees with a file's ``tokenizer.ggml.tokens``,
    as a sentence; None when every id both have holds the same token. llama.cpp stores byte-level
    BPE tokens in the same byte-to-character form as HF tokenizers, so the strings compare directly."""
    if not isinstance(file_tokens, list):
        return None  # the file carries no vocabulary to compare
    for token, token_id in sorted(vocabulary.items(), key=lambda item: item[1]):
        if 0 <= token_id < len(file_tokens) and file_tokens[token_id] != token:
            return f"token {token_id} is {file_tokens[token_id]!r} in the file but {token!r} in the tokenizer"
    return None
