"""Loading FLUX transformers and text encoders from GGUF into ComfyUI's model classes."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os

import comfy.lora
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths
import torch

from ...lora_ops import flux_family
from ...lora_ops.errors import user_facing
from ...lora_ops.gguf_file import QTensor, read_gguf, read_text_encoder_gguf_with_config
from ...lora_ops.llm_gguf import (
    llm_config,
    llm_state_dict,
    tekken_from_gguf,
    vocabulary_mismatch,
)
from ...lora_ops.lora_runtime import (
    LoraStack,
)
from .common import DEQUANT_DTYPES, RESIDENT_MODES, comfyui_version
from .lora import _APPLY_MODEL, LORA_WRAPPER_KEY, LoraStackWrapper
from .quantized import (
    FluxQModelPatcher,
    _drop_resident_on_unload,
    _saves_float_weights,
    make_ops,
)

log = logging.getLogger("fluxq")


@user_facing
class GGUFModelError(ValueError):
    pass


def detect_member(model_config, source: str) -> flux_family.Detection:
    """The FLUX family member ComfyUI's detection found, or GGUFModelError naming what it found
    instead, or why this ComfyUI cannot run it (and which version can)."""
    if model_config is None:
        raise GGUFModelError(f"{source}: not a FLUX family transformer (the tensors look like nothing "
                             "ComfyUI recognises).")
    try:
        detection = flux_family.identify(type(model_config).__name__, model_config.unet_config, source)
    except flux_family.FamilyError as error:
        raise GGUFModelError(str(error)) from None
    refusal = flux_family.refusal_for_comfyui(detection, comfyui_version())
    if refusal is not None:
        raise GGUFModelError(f"{source}: {refusal}")
    return detection


def load_flux_gguf(path: str, dequant_dtype: str = "auto", resident: str = "auto",
                   disable_dynamic: bool = False) -> FluxQModelPatcher:
    """A FLUX transformer from a .gguf file, weights kept quantized, as a ComfyUI MODEL.

    ``resident`` (``RESIDENT_MODES``): whether quantized layers may keep dequantized copies
    (see ``resident_budget``). ``disable_dynamic`` is what ComfyUI 0.33 passes when it re-creates
    a model from ``cached_patcher_init``; the pack's patcher is never dynamic, so it changes nothing."""
    if resident not in RESIDENT_MODES:
        raise GGUFModelError(f"resident: '{resident}' is not one of {', '.join(RESIDENT_MODES)}.")
    gguf_model = read_gguf(path, expected_arch="flux")
    # ComfyUI's detector only reads shapes: give it meta tensors of the logical shapes.
    shapes = {name: torch.empty(t.shape, device="meta") for name, t in gguf_model.tensors.items()}
    model_config = comfy.model_detection.model_config_from_unet(shapes, "")
    detection = detect_member(model_config, os.path.basename(path))
    log.info("FluxQLoadGGUF: %s: %s", os.path.basename(path), detection.describe())

    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    supported = model_config.supported_inference_dtypes
    unet_dtype = comfy.model_management.unet_dtype(
        model_params=comfy.utils.calculate_parameters(gguf_model.tensors), supported_dtypes=supported)
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device, supported)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    model_config.custom_operations = make_ops(DEQUANT_DTYPES[dequant_dtype])

    model = model_config.get_model(shapes, "")
    model.load_model_weights(_loadable(gguf_model.tensors), "")
    _saves_float_weights(model)
    model.diffusion_model.fluxq_resident = resident
    patcher = FluxQModelPatcher(model, load_device=load_device, offload_device=offload_device)
    # ComfyUI 0.33 re-creates a model from this when a node needs a private copy
    # (``clone(disable_dynamic=True)``, multi-GPU); clones inherit it.
    patcher.cached_patcher_init = (load_flux_gguf, (path, dequant_dtype, resident))
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, _drop_resident_on_unload)
    if resident != "off":  # the wrapper keeps resident copies in sync with the (empty) LoRA stack
        patcher.add_wrapper_with_key(_APPLY_MODEL, LORA_WRAPPER_KEY, LoraStackWrapper(LoraStack()))
    return patcher


def _loadable(tensors: dict[str, QTensor]) -> dict:
    """Quantized tensors stay ``QTensor`` (only FluxQOps layers take them); float ones become plain tensors."""
    return {name: t if t.is_quantized else t.data for name, t in tensors.items()}


# The pack's text-encoder types: flux1 is CLIP-L (+ T5-XXL), chroma T5-XXL alone, the others one
# llama.cpp GGUF language model (lora_ops.flux_family.TEXT_ENCODERS).
TEXT_ENCODER_TYPES = ("flux1", "flux2", "klein", "chroma")


@user_facing
class TextEncoderError(ValueError):
    pass


def load_text_encoders(clip_path: str, t5_path: str | None, encoder: str = "flux1"):
    """The text encoders of one FLUX family member through ComfyUI's own classes, with FluxQ layers.

    ``encoder`` (``TEXT_ENCODER_TYPES``): flux1 takes CLIP-L in ``clip_path`` and T5-XXL in
    ``t5_path`` (or CLIP-L alone); chroma, flux2 and klein take their single file in ``clip_path``.
    The CLIP's patcher becomes a ``FluxQModelPatcher`` so core LoRA patches (``lora_te1_``) on its
    quantized layers run after dequantization, as on the transformer. It opts out of ComfyUI 0.33's
    dynamic VRAM, whose patcher would move those patches where the quantized forward never reads them."""
    if encoder not in TEXT_ENCODER_TYPES:
        raise TextEncoderError(f"type: '{encoder}' is not one of {', '.join(TEXT_ENCODER_TYPES)}.")
    if encoder != "flux1" and t5_path is not None:
        raise TextEncoderError(f"type {encoder}: the encoder goes in clip_name alone; set t5_name to 'none' "
                               f"(got {os.path.basename(t5_path)}).")
    if encoder in flux_family.TEXT_ENCODERS:
        clip = _load_llm_encoder(clip_path, encoder)
    else:
        clip = _load_clip_t5(clip_path, t5_path, encoder)
    # A plain ModelPatcher here (dynamic VRAM disabled): same state, the pack's weight handling.
    clip.patcher.__class__ = FluxQModelPatcher
    clip.patcher.cached_patcher_init = (_text_encoder_patcher, (clip_path, t5_path, encoder))
    return clip


def _dynamic_off(function) -> dict:
    return {"disable_dynamic": True} if _accepts(function, "disable_dynamic") else {}


def _load_clip_t5(clip_path: str, t5_path: str | None, encoder: str):
    state_dicts, model_options = [], {"custom_operations": make_ops(None)}
    for path in (clip_path, t5_path):
        if path is None:
            continue
        if path.endswith(".gguf"):
            state, t5_config = read_text_encoder_gguf_with_config(path)
            state_dicts.append(_loadable(state))
            if t5_config:  # ComfyUI's T5 classes take a config override under "t5xxl_model_config"
                model_options["t5xxl_model_config"] = t5_config
        else:
            state_dicts.append(comfy.utils.load_torch_file(path, safe_load=True))
    if encoder == "chroma":
        clip_type = comfy.sd.CLIPType.CHROMA
    else:
        clip_type = comfy.sd.CLIPType.FLUX if t5_path else comfy.sd.CLIPType.STABLE_DIFFUSION
    return comfy.sd.load_text_encoder_state_dicts(
        state_dicts,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=clip_type,
        model_options=model_options,
        **_dynamic_off(comfy.sd.load_text_encoder_state_dicts),
    )


def _load_llm_encoder(path: str, encoder: str):
    """A FLUX.2 encoder from a llama.cpp GGUF: ComfyUI's ``flux2_te`` / ``klein_te`` built with the
    file's config (``<name>_model_config``, ComfyUI's own override), its tokenizer, the file's weights.

    ComfyUI's loader picks these classes by tensor shapes of the full-size models; the class is
    chosen here from the file's architecture instead, so any size the file declares loads the same way."""
    import comfy.text_encoders.flux as flux_te

    name = os.path.basename(path)
    if encoder == "klein" and not hasattr(comfy.sd.CLIPType, "FLUX2"):
        raise TextEncoderError(f"{name}: the FLUX.2 [klein] text encoder (Qwen3) needs ComfyUI 0.33.0 or newer; "
                               "this ComfyUI has no CLIPType.FLUX2.")
    model = read_gguf(path)
    config = llm_config(model, encoder)
    state = _loadable(llm_state_dict(model, config, encoder))
    model_options = {"custom_operations": make_ops(None)}
    tokenizer_data = {}
    target = type("ClipTarget", (), {"params": {}})()
    if encoder == "flux2":
        tokens = model.metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise TextEncoderError(f"{name}: no tokenizer in the file (metadata tokenizer.ggml.tokens); the Mistral "
                                   "tekken tokenizer is rebuilt from it.")
        tokenizer_data["tekken_model"] = tekken_from_gguf(tokens, model.metadata.get("tokenizer.ggml.token_type"), name)
        target.clip, target.tokenizer, model_name = flux_te.flux2_te(), flux_te.Flux2Tokenizer, "mistral3_24b"
        # ComfyUI's own switch for FLUX.2's pruned 30-layer file: no final norm below 40 layers.
        model_options["num_layers"] = config.layers
    else:
        model_name = "qwen3_8b" if config.lm_head else "qwen3_4b"  # Qwen3-4B ties its output to the embedding
        target.clip = flux_te.klein_te(model_type=model_name)
        target.tokenizer = flux_te.KleinTokenizer8B if config.lm_head else flux_te.KleinTokenizer
    model_options[f"{model_name}_model_config"] = config.comfy_config()

    # The tokenizer first: a vocabulary that does not fit fails before the model is built.
    embedding_directory = folder_paths.get_folder_paths("embeddings")
    try:
        tokenizer = target.tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
    except Exception as exc:
        # ComfyUI 0.3.75 builds Mistral's tokenizer through transformers' MistralConverter, whose
        # signature changed in transformers 5; 0.33 has its own pure-Python BPE instead.
        raise TextEncoderError(
            f"{name}: this ComfyUI could not build the {flux_family.TEXT_ENCODERS[encoder].label} tokenizer "
            f"({type(exc).__name__}: {exc}); ComfyUI 0.33.0 builds it without transformers.") from exc
    vocabulary = getattr(tokenizer, tokenizer.clip).tokenizer.get_vocab()
    mismatch = vocabulary_mismatch(vocabulary, model.metadata.get("tokenizer.ggml.tokens"))
    if mismatch:
        raise TextEncoderError(f"{name}: the file's vocabulary is not the {flux_family.TEXT_ENCODERS[encoder].label} tokenizer's: "
                               f"{mismatch}.")
    highest = max(vocabulary.values())
    if highest >= config.vocab:
        raise TextEncoderError(
            f"{name}: the {flux_family.TEXT_ENCODERS[encoder].label} tokenizer has token ids up to {highest}, but the file's "
            f"token_embd.weight has {config.vocab} rows: vocabulary does not fit.")
    target.tokenizer = lambda embedding_directory=None, tokenizer_data=None: tokenizer  # built once

    clip_options = {"state_dict": [state]} if _accepts(comfy.sd.CLIP.__init__, "state_dict") else {}
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory,
                         parameters=comfy.utils.calculate_parameters(state), tokenizer_data=tokenizer_data,
                         model_options=model_options, **clip_options, **_dynamic_off(comfy.sd.CLIP.__init__))
    if not clip_options:  # ComfyUI 0.3.75 loads the weights after building the model
        clip.load_sd(state)
    return clip


def _text_encoder_patcher(clip_path: str, t5_path: str | None, encoder: str = "flux1", disable_dynamic: bool = False):
    """``cached_patcher_init`` factory (0.33 passes ``disable_dynamic``; the text encoders never are)."""
    return load_text_encoders(clip_path, t5_path, encoder).patcher


def _accepts(function, parameter: str) -> bool:
    return parameter in inspect.signature(function).parameters


@contextlib.contextmanager
def training_mode():
    """What core's training node sets around its loop: ComfyUI 0.33's FLUX attention applies RoPE
    through a comfy-kitchen op without a backward unless ``model_management.in_training`` is set.
    Restored on success, error and cancel; 0.3.75 has no such flag and needs none."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous
