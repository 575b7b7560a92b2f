"""The seam between lora_ops (pure torch) and ComfyUI's model management.

Three pieces, each reusing what ComfyUI already does and adding only what it lacks:
- ``FluxQOps``: ComfyUI "custom operations" whose Linear/Embedding keep GGUF bytes as the
  parameter (so ``.to()``, offloading and ``module_size`` see the quantized size); the Linear
  runs ``lora_ops.qlinear``'s planned path (GEMV / dequant + folded LoRAs / resident copy).
- ``FluxQModelPatcher``: a ``ModelPatcher`` that never merges core patches (``LoraLoader``)
  into quantized bytes; they run after dequantization, as ComfyUI's own lowvram mode does.
- The runtime LoRA wrapper: an ``APPLY_MODEL`` wrapper holding an immutable ``LoraStack``;
  clones carry it, so strength changes and removal never touch a weight.

Only this package touches ``comfy.*``; its modules split the seam by topic:
``common`` (file choices, progress text, guidance), ``quantized`` (layers, patcher, resident
copies), ``lora`` (runtime LoRAs), ``loading`` (GGUF models and text encoders), ``sampling`` (latents,
schedules, guiders and reference latents for the family), ``training``.
"""

from ...lora_ops.lora_runtime import LoraStack
from .common import (
    CORE_DEFAULT_GUIDANCE,
    DEQUANT_DTYPES,
    RESIDENT_MODES,
    check_file_choice,
    comfyui_version,
    has_guidance_input,
    model_family,
    show_progress_text,
)
from .loading import (
    TEXT_ENCODER_TYPES,
    GGUFModelError,
    TextEncoderError,
    detect_member,
    load_flux_gguf,
    load_text_encoders,
    training_mode,
)
from .lora import (
    CLIP_LORAS_KEY,
    LORA_WRAPPER_KEY,
    ClipLoras,
    LoraMatchError,
    LoraStackWrapper,
    core_patch_count,
    get_lora_stack,
    layer_base_weight,
    load_lora_entry,
    runtime_adapters,
    with_clip_lora,
    with_lora_stack,
    without_clip_lora,
    without_core_patches,
)
from .quantized import (
    FluxQModelPatcher,
    drop_resident_layers,
    is_quantized_key,
    make_ops,
    resident_budget,
    sync_resident_layers,
)
from .sampling import (
    detected_member,
    empty_latent,
    flux2_sigmas,
    latent_geometry,
    sample_with_scheduler,
    sample_with_sigmas,
    with_reference,
)
from .training import (
    Interrupted,
    TrainingCancelled,
    cancel_requested,
    clear_cancel,
    conditioning,
    decode_images,
    load_diffusion_model,
    load_for_training,
    load_vae,
    model_inputs,
    progress_bar,
    raise_if_cancelled,
    set_module_tensor,
    show_preview,
    text_encoder_tensors,
    training_device,
    vae_tensors,
)
from .workbench import AppliedWeights, checked_file_name, lora_layers, save_path

__all__ = [
    "AppliedWeights",
    "CLIP_LORAS_KEY",
    "CORE_DEFAULT_GUIDANCE",
    "ClipLoras",
    "DEQUANT_DTYPES",
    "FluxQModelPatcher",
    "GGUFModelError",
    "Interrupted",
    "LORA_WRAPPER_KEY",
    "LoraMatchError",
    "LoraStack",
    "LoraStackWrapper",
    "RESIDENT_MODES",
    "TEXT_ENCODER_TYPES",
    "TextEncoderError",
    "TrainingCancelled",
    "cancel_requested",
    "check_file_choice",
    "checked_file_name",
    "clear_cancel",
    "comfyui_version",
    "conditioning",
    "core_patch_count",
    "decode_images",
    "detect_member",
    "detected_member",
    "drop_resident_layers",
    "empty_latent",
    "flux2_sigmas",
    "get_lora_stack",
    "has_guidance_input",
    "is_quantized_key",
    "latent_geometry",
    "layer_base_weight",
    "load_diffusion_model",
    "load_flux_gguf",
    "load_for_training",
    "load_lora_entry",
    "load_text_encoders",
    "load_vae",
    "model_inputs",
    "lora_layers",
    "make_ops",
    "model_family",
    "progress_bar",
    "raise_if_cancelled",
    "resident_budget",
    "runtime_adapters",
    "sample_with_scheduler",
    "sample_with_sigmas",
    "save_path",
    "set_module_tensor",
    "show_preview",
    "show_progress_text",
    "sync_resident_layers",
    "text_encoder_tensors",
    "training_device",
    "training_mode",
    "vae_tensors",
    "with_clip_lora",
    "with_lora_stack",
    "with_reference",
    "without_clip_lora",
    "without_core_patches",
]
