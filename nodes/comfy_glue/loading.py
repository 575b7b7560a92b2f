"""Loading FLUX transformers and text encoders from GGUF into ComfyUI's model classes."""

from __future__ import annotations

import contextlib
import inspect
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

from ...lora_ops.errors import user_facing
from ...lora_ops.gguf_file import QTensor, read_gguf, read_text_encoder_gguf
from ...lora_ops.lora_runtime import (
    LoraStack,
)
from .common import DEQUANT_DTYPES, RESIDENT_MODES
from .lora import _APPLY_MODEL, LORA_WRAPPER_KEY, LoraStackWrapper
from .quantized import (
    FluxQModelPatcher,
    _drop_resident_on_unload,
    _saves_float_weights,
    make_ops,
)


@user_facing
class GGUFModelError(ValueError):
    pass


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
    if model_config is None or "flux" not in type(model_config).__name__.lower():
        detected = "nothing ComfyUI recognises" if model_config is None else type(model_config).__name__
        raise GGUFModelError(f"{os.path.basename(path)}: not a FLUX.1 transformer (the tensors look like {detected}).")

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


def load_text_encoders(clip_path: str, t5_path: str | None):
    """CLIP-L (+ T5-XXL) for FLUX through ComfyUI's own text-encoder loader, with FluxQ layers.

    The CLIP's patcher becomes a ``FluxQModelPatcher`` so core LoRA patches (``lora_te1_``) on its
    quantized layers run after dequantization, as on the transformer. It opts out of ComfyUI 0.33's
    dynamic VRAM, whose patcher would move those patches where the quantized forward never reads them."""
    state_dicts = []
    for path in (clip_path, t5_path):
        if path is None:
            continue
        if path.endswith(".gguf"):
            state_dicts.append(_loadable(read_text_encoder_gguf(path)))
        else:
            state_dicts.append(comfy.utils.load_torch_file(path, safe_load=True))
    clip_type = comfy.sd.CLIPType.FLUX if t5_path else comfy.sd.CLIPType.STABLE_DIFFUSION
    options = {"disable_dynamic": True} if _accepts(comfy.sd.load_text_encoder_state_dicts, "disable_dynamic") else {}
    clip = comfy.sd.load_text_encoder_state_dicts(
        state_dicts,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=clip_type,
        model_options={"custom_operations": make_ops(None)},
        **options,
    )
    # A plain ModelPatcher here (dynamic VRAM disabled above): same state, the pack's weight handling.
    clip.patcher.__class__ = FluxQModelPatcher
    clip.patcher.cached_patcher_init = (_text_encoder_patcher, (clip_path, t5_path))
    return clip


def _text_encoder_patcher(clip_path: str, t5_path: str | None, disable_dynamic: bool = False):
    """``cached_patcher_init`` factory (0.33 passes ``disable_dynamic``; the text encoders never are)."""
    return load_text_encoders(clip_path, t5_path).patcher


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
