"""The seam between lora_ops (pure torch) and ComfyUI's model management.

Three pieces, each reusing what ComfyUI already does and adding only what it lacks:
- ``FluxQOps``: ComfyUI "custom operations" whose Linear/Embedding keep GGUF bytes as the
  parameter (so ``.to()``, offloading and ``module_size`` see the quantized size); the Linear
  runs ``lora_ops.qlinear``'s planned path (GEMV / dequant + folded LoRAs / resident copy).
- ``FluxQModelPatcher``: a ``ModelPatcher`` that never merges core patches (``LoraLoader``)
  into quantized bytes; they run after dequantization, as ComfyUI's own lowvram mode does.
- The runtime LoRA wrapper: an ``APPLY_MODEL`` wrapper holding an immutable ``LoraStack``;
  clones carry it, so strength changes and removal never touch a weight.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import sys
import uuid

import torch

import comfy.lora
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import folder_paths

from ..lora_ops.dequant import dequantize
from ..lora_ops.gguf_file import QTensor, read_gguf, read_text_encoder_gguf
from ..lora_ops.lora_formats import (
    LoraFormatError,
    describe_format,
    detect_format,
    header_scale,
    normalize_flux_lora,
    read_lora_file_with_metadata,
)
from ..lora_ops.lora_runtime import (
    REMOVE_ALL,
    DoRAAdapter,
    KroneckerAdapter,
    LoraEntry,
    LoraStack,
    LowRankAdapter,
    activate,
    active_adapters,
    hadamard_as_low_rank,
    install_hooks,
)
from ..lora_ops.qlinear import GGUF_LAYOUT, build_resident, dequantize_weight, quantized_linear, repack

log = logging.getLogger("fluxq")

DEQUANT_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RESIDENT_MODES = ("off", "auto", "on")


def check_file_choice(folder: str, input_name: str, value: str, extra_choices: tuple[str, ...] = ()) -> bool | str:
    """``validate_inputs`` for a file dropdown: ComfyUI 0.3.75 does not check V3 combo values, so
    an API prompt could name any file. Returns True or the message ComfyUI shows (HTTP 400)."""
    if value in extra_choices or value in folder_paths.get_filename_list(folder):
        return True
    # the folders as the user knows them (diffusion_models, unet), not the pack's registry key
    names = dict.fromkeys(os.path.basename(os.path.normpath(p)) for p in folder_paths.get_folder_paths(folder))
    return f"{input_name}: '{value}' is not a file in ComfyUI's model folders ({', '.join(names)})."


def show_progress_text(text: str, node_id) -> None:
    """Text on the node in the UI. Looked up, not imported: called as a library (tests, scripts)
    there is no running server to tell."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)


# What core's FLUX model uses when the conditioning carries no guidance (comfy.model_base.Flux.extra_conds).
CORE_DEFAULT_GUIDANCE = 3.5


def has_guidance_input(model) -> bool:
    """Whether a FLUX MODEL takes distilled guidance (dev has a guidance_in layer; schnell has none)."""
    return bool(model.model.model_config.unet_config.get("guidance_embed", False))


# --- quantized layers --------------------------------------------------------------------


class _QuantizedWeightMixin:
    """Holds either a float weight (ComfyUI's usual path) or GGUF bytes plus their type/shape."""

    qtype = None
    qshape = None
    qlayout = GGUF_LAYOUT
    dequant_dtype = None
    # A kept dequantized (+ folded LoRA) copy of the weight, see ``sync_resident_layers``.
    resident = None
    # Core patches (LoraLoader) of this quantized weight, set by FluxQModelPatcher at a full load.
    # Kept apart from ``weight_function``, which ComfyUI wipes and refills as layers move between
    # full and lowvram loading.
    core_patch = None

    def _take_tensor(self, value, name: str) -> None:
        if isinstance(value, QTensor):
            if value.is_quantized:
                self.qtype, self.qshape = value.qtype, tuple(value.shape)
                setattr(self, name, torch.nn.Parameter(self._repacked(value.data), requires_grad=False))
                return
            value = value.data
        setattr(self, name, torch.nn.Parameter(value, requires_grad=False))

    def _repacked(self, data: torch.Tensor) -> torch.Tensor:
        data, self.qlayout = repack(data, self.qtype)
        return data

    @property
    def applies_lora_itself(self) -> bool:
        """Quantized layers fold or add runtime LoRAs in their own pass (the hook stands aside)."""
        return self.qtype is not None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in ("weight", "bias"):
            key = prefix + name
            if key in state_dict:
                self._take_tensor(state_dict[key], name)
            elif name == "weight" or getattr(self, "bias", None) is not None:
                missing_keys.append(key)

    def _quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device
        raw = self.weight.to(device, non_blocking=comfy.model_management.device_supports_non_blocking(device))
        return quantized_linear(
            x, raw, self.qtype, self.qshape, self.qlayout, self._cast_bias(x.dtype, device),
            pairs=active_adapters(self), resident=self.resident, weight_patches=self._weight_patches(),
            arith_dtype=self.dequant_dtype,
        )

    def _dequantized_base(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        raw = self.weight.to(device, non_blocking=comfy.model_management.device_supports_non_blocking(device))
        return dequantize_weight(raw, self.qtype, self.qshape, self.qlayout, self.dequant_dtype or dtype).to(dtype)

    def _dequantized_weight(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        weight = self._dequantized_base(dtype, device)
        for patch in self._weight_patches():
            weight = patch(weight)
        return weight

    def _weight_patches(self) -> list:
        patches = self.weight_function
        # A lowvram load brings its own LowVramPatch for the key: apply the patches once, not twice.
        if self.core_patch is not None and not any(getattr(p, "key", None) == self.core_patch.key for p in patches):
            patches = [*patches, self.core_patch]
        return patches

    def _cast_bias(self, dtype: torch.dtype, device: torch.device):
        if self.bias is None:
            return None
        bias = comfy.model_management.cast_to(self.bias, dtype, device, copy=len(self.bias_function) > 0)
        for patch in self.bias_function:
            bias = patch(bias)
        return bias


def make_ops(dequant_dtype: torch.dtype | None):
    """Operations for ``model_options['custom_operations']``: ComfyUI's manual_cast plus GGUF layers."""

    class FluxQOps(comfy.ops.manual_cast):
        class Linear(_QuantizedWeightMixin, comfy.ops.manual_cast.Linear):
            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                # No allocation here: the loader assigns the (quantized) tensors, and a full-size
                # FLUX would otherwise allocate ~24 GB of empty float weights first.
                torch.nn.Module.__init__(self)
                self.in_features, self.out_features = in_features, out_features
                self.weight = None
                self.bias = None
                self.dequant_dtype = dequant_dtype

            def forward(self, x):
                if self.qtype is None:
                    return super().forward(x)
                comfy.ops.run_every_op()
                return self._quantized_forward(x)

        class Embedding(comfy.ops.manual_cast.Embedding):
            # Text encoders read embedding tables directly (``.weight`` added to activations), so a
            # quantized table is expanded once at load; it is a small part of T5/CLIP anyway.
            def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
                key = prefix + "weight"
                table = state_dict.get(key)
                if isinstance(table, QTensor):
                    state_dict[key] = dequantize(table.data, table.qtype, table.shape, dequant_dtype or torch.float32)
                super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    return FluxQOps


def is_quantized_key(model: torch.nn.Module, key: str) -> bool:
    module_path, _, param = key.rpartition(".")
    module = comfy.utils.get_attr(model, module_path) if module_path else model
    return param == "weight" and getattr(module, "qtype", None) is not None


class FluxQModelPatcher(comfy.model_patcher.ModelPatcher):
    """Core LoRA patches on quantized weights run after dequantization instead of being merged.

    Merging would mean re-quantizing (lossy) or keeping a float copy (the memory GGUF saves).
    This is what ComfyUI does itself for lowvram layers, so we reuse its ``LowVramPatch``.
    It stays a classic patcher under ComfyUI's dynamic VRAM (docs/ARCHITECTURE.md says why).
    """

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, **kwargs):
        # ComfyUI 0.33 added ``return_weight`` (its save path reads the patched weight through it)
        # and ``force_cast``; 0.3.75 passes neither, so they travel as kwargs.
        if not is_quantized_key(self.model, key):
            return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update, **kwargs)
        module = comfy.utils.get_attr(self.model, key.rpartition(".")[0])
        patch = comfy.model_patcher.LowVramPatch(key, self.patches) if key in self.patches else None
        if kwargs.get("return_weight"):
            weight = module._dequantized_base(self.model.get_dtype(), device_to or self.offload_device)
            return weight if patch is None else patch(weight)
        if patch is not None:
            module.core_patch = patch
        return None

    def clone(self, *args, **kwargs):
        clone = super().clone(*args, **kwargs)
        # ComfyUI 0.33's clone copies it; 0.3.75's does not know the attribute.
        clone.cached_patcher_init = getattr(self, "cached_patcher_init", None)
        return clone

    def pin_weight_to_device(self, key):
        # GGUF bytes are read-only views of a memory-mapped file: pinning them (cudaHostRegister)
        # fails or pins the page cache, and upstream then reports "unpin tensor not pinned by ComfyUI".
        if not is_quantized_key(self.model, key):
            super().pin_weight_to_device(key)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)
        if unpatch_weights:
            for module in self.model.modules():
                if getattr(module, "qtype", None) is not None:
                    module.core_patch = None

    def partially_unload(self, *args, **kwargs):
        # ComfyUI frees memory under pressure here; resident copies are the first thing to give up.
        drop_resident_layers(self)
        return super().partially_unload(*args, **kwargs)


# --- resident copies ---------------------------------------------------------------------


def resident_budget(mode: str, base_model, x: torch.Tensor) -> float:
    """Bytes of dequantized copies one model call may add.

    ``on``: no limit. ``off``, and ``auto`` on the CPU or in ComfyUI's low-VRAM modes: none.
    ``auto`` on a GPU: what ComfyUI reports free, less what this call's inference needs by
    ComfyUI's own estimate (``memory_required`` of the input) and its minimum inference reserve;
    so the copies only take memory that streaming would have left unused.
    """
    mm = comfy.model_management
    if mode == "on":
        return float("inf")
    if mode == "off" or x.device.type == "cpu" or mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM):
        return 0.0
    reserve = base_model.memory_required(x.shape) + mm.minimum_inference_memory()
    return mm.get_free_memory(x.device) - reserve


def sync_resident_layers(base_model, stack: LoraStack, x: torch.Tensor) -> None:
    """Before a model call (outside any compiled graph): make quantized layers resident while the
    budget allows, and rebuild the copies whose folded LoRAs changed, from the quantized bytes."""
    diffusion_model = base_model.diffusion_model
    mode = getattr(diffusion_model, "fluxq_resident", "off")
    if mode == "off":
        return
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()
    budget = None  # asked of ComfyUI only when a new copy is considered
    with torch.inference_mode(False), torch.no_grad():  # usable by the trainer's autograd too
        for path, module in diffusion_model.named_modules():
            if getattr(module, "qtype", None) is None:
                continue
            if module.weight.device != x.device or module._weight_patches():
                module.resident = None  # offloaded by ComfyUI (lowvram) or core-patched: streaming
                continue
            if module.resident is None:
                budget = resident_budget(mode, base_model, x) if budget is None else budget
                need = math.prod(module.qshape) * dtype.itemsize
                if need > budget:
                    continue
                budget -= need
            frozen = tuple(p for p in stack.adapters_for(path) if not p[1].trainable)
            module.resident = build_resident(module.resident, module.weight, module.qtype, module.qshape,
                                             module.qlayout, frozen, dtype, module.dequant_dtype)


def drop_resident_layers(patcher) -> None:
    """Frees every resident copy (ComfyUI unloads or partially unloads the model)."""
    for module in patcher.model.modules():
        if getattr(module, "resident", None) is not None:
            module.resident = None


def _drop_resident_on_unload(patcher, unpatch_all: bool) -> None:
    # ComfyUI's model_unload detaches with unpatch_all=True; a clone being garbage-collected (every
    # strength change makes one) or another clone of the same model taking over passes False and
    # must leave the shared layers' copies alone.
    if unpatch_all:
        drop_resident_layers(patcher)


def _saves_float_weights(model) -> None:
    """Core's ModelSave/CheckpointSave read the diffusion model through ``BaseModel.state_dict_for_saving``
    (0.3.75 straight from the module state dict, 0.33 from its patcher's lazily cast copy); both would
    hand over raw GGUF bytes. Here each quantized weight is replaced by its dequantized value with the
    core patches of the patcher that the save loaded, so the file is a float checkpoint core reads back."""
    original = model.state_dict_for_saving

    def state_dict_for_saving(*args, **kwargs):
        state = original(*args, **kwargs)
        quantized = {name + ".weight": m for name, m in model.diffusion_model.named_modules()
                     if getattr(m, "qtype", None) is not None}
        saved_names = model.model_config.process_unet_state_dict_for_saving({k: k for k in quantized})
        for saved, key in saved_names.items():
            state[saved] = quantized[key]._dequantized_weight(model.get_dtype(), torch.device("cpu"))
        return state

    model.state_dict_for_saving = state_dict_for_saving


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


# --- runtime LoRA ------------------------------------------------------------------------

LORA_WRAPPER_KEY = "fluxq_lora"
_APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL


class LoraStackWrapper:
    """Runs each model call with this patcher's LoRA stack active on the shared modules (and the
    resident copies of quantized layers folded for it)."""

    def __init__(self, stack: LoraStack):
        self.stack = stack

    def __deepcopy__(self, memo):
        return self  # the stack is immutable; ComfyUI deep-copies model_options per clone

    def __call__(self, executor, *args, **kwargs):
        base_model = executor.class_obj
        install_hooks(base_model.diffusion_model, self.stack.module_paths(), layer_base_weight)
        sync_resident_layers(base_model, self.stack, args[0])
        with activate(self.stack):
            return executor(*args, **kwargs)


def core_patch_count(model) -> int:
    """How many weights carry core patches (LoraLoader / LoraLoaderModelOnly and the like)."""
    return len(model.patches)


def without_core_patches(model):
    """A clone whose weights carry no core patches: the truly unpatched base. Runtime LoRAs and
    object patches (sampling shift) stay. ComfyUI has no call to drop patches, so the clone gets an
    empty patch table and a new patches_uuid, which makes ComfyUI unpatch the shared weights
    (restoring its backups) before this clone samples."""
    clone = model.clone()
    clone.patches = {}
    clone.patches_uuid = uuid.uuid4()
    return clone


def get_lora_stack(model) -> LoraStack:
    wrappers = model.get_wrappers(_APPLY_MODEL, LORA_WRAPPER_KEY)
    return wrappers[0].stack if wrappers else LoraStack()


def with_lora_stack(model, stack: LoraStack):
    """A clone of ``model`` whose runtime LoRAs are ``stack``; the upstream model is unchanged."""
    clone = model.clone()
    clone.remove_wrappers_with_key(_APPLY_MODEL, LORA_WRAPPER_KEY)
    # An emptied stack keeps its wrapper: resident copies must be re-synced to no LoRA.
    clone.add_wrapper_with_key(_APPLY_MODEL, LORA_WRAPPER_KEY, LoraStackWrapper(stack))
    return clone


# --- a LoRA's CLIP-L part (core patches, recorded by LoRA name) -----------------------------

CLIP_LORAS_KEY = "fluxq_clip_loras"


class ClipLoras:
    """Which core patches each FluxQ LoRA added to a CLIP: {lora name: ((weight key, adapter), ...)}.

    Core CLIP patches are anonymous and add up; this record (a patcher attachment, shared by
    clones, never changed) is what lets the CLIP follow the MODEL's rule: applying a file again
    replaces its earlier patches, and removal takes exactly its patches out.
    """

    def __init__(self, by_name: dict[str, tuple[tuple[str, object], ...]]):
        self.by_name = by_name


def _clip_loras(clip) -> dict[str, tuple[tuple[str, object], ...]]:
    record = clip.patcher.get_attachment(CLIP_LORAS_KEY)
    return record.by_name if record is not None else {}


def without_clip_lora(clip, name: str):
    """A clone of ``clip`` without the patches FluxQ LoRA ``name`` added (every FluxQ LoRA's for
    ``"all"``); core LoraLoader patches stay. ``clip`` itself if there is nothing to remove."""
    applied = _clip_loras(clip)
    names = list(applied) if name == REMOVE_ALL else [name] if name in applied else []
    if not names:
        return clip
    out = clip.clone()
    patches = out.patcher.patches
    for removed in names:
        for key, adapter in applied[removed]:
            remaining = [patch for patch in patches.get(key, []) if patch[1] is not adapter]
            if remaining:
                patches[key] = remaining
            else:
                patches.pop(key, None)
    out.patcher.patches_uuid = uuid.uuid4()  # the weights differ from the clone's parent's
    out.patcher.set_attachments(CLIP_LORAS_KEY, ClipLoras({n: p for n, p in applied.items() if n not in names}))
    return out


def with_clip_lora(clip, name: str, clip_patches: dict, strength: float):
    """A clone of ``clip`` with LoRA ``name``'s core patches at ``strength``, replacing any earlier
    application of the same name."""
    out = without_clip_lora(clip, name)
    out = out.clone() if out is clip else out
    added = set(out.add_patches(clip_patches, strength))
    record = tuple((k if isinstance(k, str) else k[0], adapter) for k, adapter in clip_patches.items() if k in added)
    out.patcher.set_attachments(CLIP_LORAS_KEY, ClipLoras({**_clip_loras(out), name: record}))
    return out


class LoraMatchError(ValueError):
    pass


def _matched_keys(patches: dict, lora_sd: dict) -> set[str]:
    """The file's keys ComfyUI consumed: the adapters' own keys plus their ``.alpha``/``.dora_scale``."""
    loaded = set().union(*(getattr(adapter, "loaded_keys", ()) for adapter in patches.values()))
    extras = {
        k for k in lora_sd
        if k.endswith((".alpha", ".dora_scale")) and any(l.startswith(k.rsplit(".", 1)[0] + ".") for l in loaded)
    }
    return loaded | extras


def _row_order(function, rows: int, lora_name: str, key: str) -> torch.Tensor | None:
    """The row permutation a key-map transform applies to an update of ``rows`` rows, or None.

    ComfyUI's FLUX map reorders rows (``swap_scale_shift`` on ``final_layer.adaLN_modulation.1``:
    diffusers orders them [scale; shift], BFL [shift; scale]). The runtime path applies any
    function that only reorders rows; anything else is refused rather than silently dropped.
    """
    if function is None:
        return None
    probe = torch.arange(rows, dtype=torch.float64).unsqueeze(1)
    order = None
    try:
        moved = function(probe)
        if moved.shape == probe.shape and torch.equal(moved.flatten().sort().values, probe.flatten()):
            order = moved.flatten().long()
            columns = torch.randn(rows, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            if not torch.equal(function(columns), columns[order]):
                order = None
    except Exception:  # noqa: BLE001 - any failure means "not a row reordering"
        order = None
    if order is None:
        name = getattr(function, "__name__", repr(function))
        raise LoraMatchError(
            f"{lora_name}: ComfyUI's key map transforms the update of {key} with {name}, which is not a "
            "reordering of rows; the runtime path cannot apply it exactly, so the LoRA is refused. "
            "Use core 'LoraLoaderModelOnly' for this file and report it."
        )
    return None if torch.equal(order, torch.arange(rows)) else order


def _alpha_scale(alpha, dim: int) -> float | None:
    return None if alpha is None else float(alpha) / dim


def _inner_adapter(x, kind, weights, header, out_slice, row_order, lora_name):
    """(adapter, scale or None, scale source, dora_scale) from core's parsed weights, scaled as core does."""
    if kind == "LoRA":
        up, down, alpha, mid, dora_scale, reshape = weights
        if mid is not None or reshape is not None:
            raise LoraMatchError(f"{lora_name}: {x} uses LoCon mid/reshape weights (conv layers), which FLUX's "
                                 "linear layers do not have.")
        rank = down.shape[0]
        scale, source = _alpha_scale(alpha, rank), "alpha"
        if scale is None and header is not None:
            scale, source = header.scale(_peft_module_name(x), rank, lora_name), "header"
    elif kind == "LoHa":
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale = weights
        if t1 is not None or t2 is not None:
            raise LoraMatchError(f"{lora_name}: {x} uses LoHa Tucker weights (conv layers), which FLUX's linear "
                                 "layers do not have.")
        scale, source = _alpha_scale(alpha, w1b.shape[0]), "alpha"
        down, up = hadamard_as_low_rank(w1a, w1b, w2a, w2b)
    else:
        w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale = weights
        if t2 is not None:
            raise LoraMatchError(f"{lora_name}: {x} uses LoKr Tucker weights (conv layers), which FLUX's linear "
                                 "layers do not have.")
        dim = None  # as core: alpha counts against the rank of the last factorised side
        if w1 is None:
            w1, dim = w1_a.float() @ w1_b.float(), w1_b.shape[0]
        if w2 is None:
            w2, dim = w2_a.float() @ w2_b.float(), w2_b.shape[0]
        scale, source = (_alpha_scale(alpha, dim), "alpha") if dim is not None else (None, "lokr_full")
        adapter = KroneckerAdapter(w1, w2, scale=1.0 if scale is None else scale, out_slice=out_slice,
                                   row_order=row_order)
        return adapter, scale, source, dora_scale
    adapter = LowRankAdapter(down=down, up=up, scale=1.0 if scale is None else scale, out_slice=out_slice,
                             row_order=row_order)
    return adapter, scale, source, dora_scale


def _runtime_adapter(x: str, target, adapter, diffusion_model, lora_name: str, header):
    """(module path, runtime adapter, where its scale came from) for one entry of core's patches.

    ``target`` is core's key-map value: a key, or ``(key, (dim, offset, size)[, function])``.
    Scales follow core (``alpha / rank``) when the file has ``.alpha``; else the header rule.
    """
    key = target[0] if isinstance(target, tuple) else target
    offset = target[1] if isinstance(target, tuple) else None
    function = target[2] if isinstance(target, tuple) and len(target) > 2 else None
    kind = "full weight diff" if isinstance(adapter, tuple) else type(adapter).__name__.replace("Adapter", "")
    if kind not in ("LoRA", "LoHa", "LoKr"):
        raise LoraMatchError(
            f"{lora_name}: {x} is a {kind} adapter; the runtime path applies LoRA, LoHa, LoKr and DoRA. "
            "Use ComfyUI's core 'LoraLoaderModelOnly' for this file: it works on FluxQ GGUF models too."
        )
    module_path = key[len("diffusion_model."):-len(".weight")]
    is_weight = key.startswith("diffusion_model.") and key.endswith(".weight")
    module = diffusion_model.get_submodule(module_path) if is_weight else None
    if not hasattr(module, "in_features") or (offset is not None and offset[0] != 0):
        raise LoraMatchError(f"{lora_name}: {x} targets {key}, which is not the weight (or a row range of it) of a "
                             "linear layer; the runtime path adapts linear layers only.")
    rows = offset[2] if offset is not None else module.out_features
    out_slice = (offset[1], offset[2]) if offset is not None else None
    row_order = _row_order(function, rows, lora_name, key)
    shape = (rows, module.in_features)

    try:
        inner, scale, source, dora_scale = _inner_adapter(x, kind, adapter.weights, header, out_slice, row_order,
                                                          lora_name)
    except (ValueError, RuntimeError, IndexError) as e:
        if isinstance(e, (LoraMatchError, LoraFormatError)):
            raise
        raise LoraMatchError(f"{lora_name}: {x} ({kind}) does not fit {module_path} {shape}: {e}") from None
    got = tuple(inner.up.shape[:1] + inner.down.shape[1:]) if isinstance(inner, LowRankAdapter) else inner.shape
    if got != shape:
        raise LoraMatchError(f"{lora_name}: {x} ({kind}) gives an update of shape {got}, but {module_path}"
                             f"{'' if offset is None else f' rows {offset[1]}..{offset[1] + offset[2]}'} is {shape}.")
    if scale is None and source != "lokr_full":
        source = "none"
    if dora_scale is not None:
        if dora_scale.shape not in ((rows, 1), (1, module.in_features)):
            raise LoraMatchError(f"{lora_name}: {x}.dora_scale has shape {tuple(dora_scale.shape)}; {module_path} "
                                 f"needs ({rows}, 1) or (1, {module.in_features}).")
        return module_path, DoRAAdapter(inner, dora_scale, out_slice=out_slice), source
    return module_path, inner, source


def _peft_module_name(x: str) -> str:
    """The module name PEFT matches its patterns against: the key-map name without its prefix."""
    for prefix in ("transformer.", "diffusion_model."):
        if x.startswith(prefix):
            return x[len(prefix):]
    return x


_SCALE_SOURCES = {
    "alpha": "scale alpha/rank from the file's .alpha tensors",
    "header": "scale from the header's lora_adapter_metadata (diffusers/PEFT)",
    "none": "scale 1 (the file records no alpha)",
    "lokr_full": "scale 1 (LoKr with unfactorised matrices: alpha does not apply)",
}


def layer_base_weight(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A layer's weight in float, without patches: what DoRA's norms are taken of."""
    if getattr(module, "qtype", None) is not None:
        return module._dequantized_base(dtype, device)
    return comfy.model_management.cast_to(module.weight, dtype, device)


def runtime_adapters(model, lora_sd: dict, lora_name: str, header=None):
    """Core's key map and adapter parsing, turned into runtime adapters.

    Returns ``({module_path: [adapter, ...]}, matched file keys, {scale source: count})``.
    Each key-map entry is parsed on its own so its name is known (PEFT patterns match names);
    as in core, a later entry for the same target replaces an earlier one.
    """
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    model_keys = model.model.state_dict().keys()
    patches = {}
    for x, target in key_map.items():
        for parsed_target, adapter in comfy.lora.load_lora(lora_sd, {x: target}, log_missing=False).items():
            key = parsed_target[0] if isinstance(parsed_target, tuple) else parsed_target
            if key in model_keys:  # as core's add_patches: targets the model lacks are not applied
                patches[parsed_target] = (x, adapter)
    diffusion_model = model.model.diffusion_model
    adapters: dict[str, list] = {}
    sources: dict[str, int] = {}
    for target, (x, adapter) in patches.items():
        module_path, runtime, source = _runtime_adapter(x, target, adapter, diffusion_model, lora_name, header)
        adapters.setdefault(module_path, []).append(runtime)
        sources[source] = sources.get(source, 0) + 1
    matched = _matched_keys({t: a for t, (_, a) in patches.items()}, lora_sd)
    return adapters, matched, sources


def load_lora_entry(model, lora_name: str, strength: float, clip=None, strength_clip: float = 0.0):
    """Parse a LoRA file with ComfyUI's own key mapping into a runtime ``LoraEntry``.

    Returns ``(entry, clip_or_None, report)``. CLIP (``lora_te1_``) keys go through core patches.
    """
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    lora_sd, metadata = read_lora_file_with_metadata(path)  # refuses pickles; checks header, NaN/Inf, dtypes
    fmt = detect_format(lora_sd.keys())
    lora_sd = normalize_flux_lora(lora_sd)
    adapters, matched, sources = runtime_adapters(model, lora_sd, lora_name, header_scale(metadata, lora_name))

    clip_out = None
    if clip is not None:
        clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        clip_patches = comfy.lora.load_lora(lora_sd, clip_map, log_missing=False)
        matched |= _matched_keys(clip_patches, lora_sd)
        clip_out = with_clip_lora(clip, lora_name, clip_patches, strength_clip)

    if not adapters:
        raise LoraMatchError(
            f"{lora_name}: matched no layer of this FLUX model ({len(lora_sd)} keys, format '{fmt}'). "
            f"It {describe_format(lora_sd.keys())}."
        )
    unmatched = sorted(k for k in lora_sd if k not in matched)
    entry = LoraEntry(name=lora_name, strength=float(strength),
                      adapters={path: tuple(a) for path, a in adapters.items()})
    scale_note = "; ".join(
        _SCALE_SOURCES[s] + ("" if len(sources) == 1 else f" ({n} modules)") for s, n in sorted(sources.items()))
    report = f"{lora_name} ({fmt}): {len(adapters)} modules matched, {len(unmatched)} keys unmatched"
    if unmatched:
        report += ": " + ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
    report += f"; {scale_note}"
    if unmatched:
        log.warning("[FluxQ] %s", report)
    else:
        log.info("[FluxQ] %s", report)
    return entry, clip_out, report


# --- training --------------------------------------------------------------------------

def load_for_training(model) -> torch.device:
    """Loads only the transformer, fully (the text encoders and VAE are done, so ComfyUI may
    evict them); returns the device it runs on."""
    comfy.model_management.load_models_gpu([model], memory_required=1e20, force_full_load=True)
    return model.load_device


def set_module_tensor(module: torch.nn.Module, name: str, tensor: torch.Tensor, parameter: bool) -> None:
    """Replaces a parameter or buffer by dotted name, the way ComfyUI's patcher does."""
    if parameter:
        comfy.utils.set_attr_param(module, name, tensor)
    else:
        comfy.utils.set_attr(module, name, tensor)


def progress_bar(total: int, node_id):
    """ComfyUI's progress bar (shown on the node in a server; a no-op as a library)."""
    return comfy.utils.ProgressBar(total, node_id=node_id)


def cancel_requested() -> bool:
    return comfy.model_management.processing_interrupted()


def request_cancel() -> None:
    """What ComfyUI's cancel button does; the trainer saves after the step and stops."""
    comfy.model_management.interrupt_current_processing(True)


def raise_if_cancelled() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def load_diffusion_model(path: str):
    """A FLUX transformer as ComfyUI loads it: .gguf through this pack, anything else through core."""
    if path.endswith(".gguf"):
        return load_flux_gguf(path)
    return comfy.sd.load_diffusion_model(path)


def load_vae(path: str):
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(path, safe_load=True))


def vae_tensors(vae):
    """The VAE's named weights (its identity for the latent cache)."""
    return vae.first_stage_model.state_dict().items()


def text_encoder_tensors(clip):
    """The text encoders' named weights, or None when LoRA patches change them at run time (their
    embeddings are then not cached: a patch set has no stable identity)."""
    if clip.patcher.patches:
        return None
    return clip.cond_stage_model.state_dict().items()


def conditioning(context: torch.Tensor, pooled: torch.Tensor) -> list:
    """A CONDITIONING (what CLIPTextEncode outputs) from one caption's embeddings."""
    return [[context[None], {"pooled_output": pooled[None]}]]


def decode_images(vae, latent: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) of a latent batch, as VAEDecode."""
    return vae.decode(latent)


def show_preview(progress, value: int, image) -> None:
    """A PIL image on the node as a progress preview (as samplers show their steps)."""
    progress.update_absolute(value, preview=("JPEG", image, 512))


def training_device() -> torch.device:
    return comfy.model_management.get_torch_device()
