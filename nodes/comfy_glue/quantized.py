"""Quantized layers (``FluxQOps``), the ``FluxQModelPatcher`` and resident copies."""

from __future__ import annotations

import functools
import math

import comfy.lora
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import torch

from ...lora_ops.dequant import dequantize
from ...lora_ops.gguf_file import QTensor
from ...lora_ops.lora_runtime import (
    LoraStack,
    active_loras,
)
from ...lora_ops.qlinear import (
    GGUF_LAYOUT,
    build_resident,
    dequantize_weight,
    quantized_linear,
    repack,
)

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
            pairs=active_loras(self), resident=self.resident, weight_patches=self._weight_patches(),
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


@functools.cache
def make_ops(dequant_dtype: torch.dtype | None):
    """Operations for ``model_options['custom_operations']``: ComfyUI's manual_cast plus GGUF layers.

    One set of classes per dequant dtype, not per load: torch.compile guards on each layer's
    class, so a model loaded again (another ``resident`` mode, a reload after unloading) with new
    classes would recompile everything."""

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


def lora_target(base_model) -> torch.nn.Module:
    """The diffusion model whose layers the LoRAs adapt: core's TorchCompileModel may have swapped
    in its compiled wrapper (``OptimizedModule``, whose module names start with ``_orig_mod.``)."""
    diffusion_model = base_model.diffusion_model
    return getattr(diffusion_model, "_orig_mod", diffusion_model)


def compute_dtype(base_model) -> torch.dtype:
    return base_model.manual_cast_dtype or base_model.get_dtype()


def sync_resident_layers(base_model, stack: LoraStack, x: torch.Tensor) -> None:
    """Before a model call (outside any compiled graph): make quantized layers resident while the
    budget allows, and rebuild the copies whose folded LoRAs changed, from the quantized bytes."""
    diffusion_model = lora_target(base_model)
    mode = getattr(diffusion_model, "fluxq_resident", "off")
    if mode == "off":
        return
    dtype = compute_dtype(base_model)
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
            loras = stack.layer_loras(path, module.out_features, module.in_features, x.device, dtype)
            module.resident = build_resident(module.resident, module.weight, module.qtype, module.qshape,
                                             module.qlayout, loras, dtype, module.dequant_dtype)


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
