"""What the trainer needs from ComfyUI: devices, progress, cancel, VAE/encoder tensors."""

from __future__ import annotations

import inspect

import comfy.lora
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import comfy.utils
import torch

from ...lora_ops.errors import user_facing
from .loading import load_flux_gguf

# --- training --------------------------------------------------------------------------

def load_for_training(model) -> torch.device:
    """Loads the transformer, fully, and evicts every other model ComfyUI holds on its device: the
    captions and images are encoded before (the VAE comes back only for a sample), so during the
    steps the transformer is the only model resident (FLUX.2 [dev]'s 24 B text encoder is not).
    Returns the device it runs on.

    load_models_gpu's memory_required=1e20 asks ComfyUI to free everything else, but it frees
    nothing on the CPU, and 0.33's dynamic models are kept when the model loaded is dynamic too:
    the eviction is asked for by name, keeping the transformer (it stays, no reload)."""
    mm = comfy.model_management
    mm.load_models_gpu([model], memory_required=1e20, force_full_load=True)
    keep = [loaded for loaded in mm.current_loaded_models if loaded.model is model]
    mm.free_memory(1e30, model.load_device, keep_loaded=keep)
    return model.load_device


def set_module_tensor(module: torch.nn.Module, name: str, tensor: torch.Tensor, parameter: bool) -> None:
    """Replaces a parameter or buffer by dotted name, the way ComfyUI's patcher does."""
    if parameter:
        comfy.utils.set_attr_param(module, name, tensor)
    else:
        comfy.utils.set_attr(module, name, tensor)


def cancel_requested() -> bool:
    return comfy.model_management.processing_interrupted()


def clear_cancel() -> None:
    """Consumes a cancel the trainer saw between steps (ComfyUI clears it when it raises)."""
    comfy.model_management.interrupt_current_processing(False)


# ComfyUI's cancel arrives as this exception from wherever the run is: its progress hook, every
# layer's forward (`comfy.ops.run_every_op`), a sampler. (An Exception in 0.3.75, a BaseException
# since 0.33 so that `except Exception` does not swallow it.)
Interrupted = comfy.model_management.InterruptProcessingException


@user_facing
class TrainingCancelled(Interrupted):
    """A cancelled training run, after it kept what it had trained: ComfyUI's executor reports it
    as the interrupt it is, and the training script tells the user which file to resume from.
    `saved` is the checkpoint holding the last finished step (None: no step finished)."""

    def __init__(self, message: str, saved: str | None = None, step: int = 0):
        super().__init__(message)
        self.saved, self.step = saved, step

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


def conditioning(context: torch.Tensor, pooled: torch.Tensor | None) -> list:
    """A CONDITIONING (what CLIPTextEncode outputs) from one caption's embeddings."""
    return [[context[None], {"pooled_output": None if pooled is None else pooled[None]}]]


def model_inputs(model, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor | None,
                 guidance: float | None, dtype: torch.dtype, reference: torch.Tensor | None = None) -> dict:
    """The diffusion model's keyword inputs for a batch, as ComfyUI's sampler makes them from a
    conditioning: the model's own ``extra_conds`` (its context padding, pooled vector, guidance
    default, reference latents), repeated to the batch and cast to `dtype` (lists element-wise)
    like ``BaseModel._apply_model``. `guidance` None gives the model none (klein, schnell).
    `reference` (B, C, H, W), VAE latents of edit pairs' control images, is the conditioning's
    ``reference_latents`` as core's ReferenceLatent sets it (one reference image per sample)."""
    base = model.model
    extra = {} if reference is None else {"reference_latents": [reference]}
    conds = base.extra_conds(noise=x, device=x.device, cross_attn=context, pooled_output=pooled, guidance=guidance,
                             **extra)
    out = {}
    for name, cond in conds.items():
        value = cond.process_cond(batch_size=x.shape[0], area=None, device=x.device).cond
        if isinstance(value, list):
            out[name] = [comfy.model_base.convert_tensor(v, dtype, x.device) for v in value]
        else:
            out[name] = comfy.model_base.convert_tensor(value, dtype, x.device)
    return out


def takes_reference_latents(model) -> bool:
    """Whether the diffusion model takes reference latents (FLUX.1 Kontext and FLUX.2 do; Chroma's
    forward would swallow them unused in its **kwargs)."""
    return "ref_latents" in inspect.signature(model.model.diffusion_model.forward).parameters


def decode_images(vae, latent: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) of a latent batch, as VAEDecode."""
    return vae.decode(latent)


def show_preview(progress, value: int, image) -> None:
    """A PIL image on the node as a progress preview (as samplers show their steps)."""
    progress.update_absolute(value, preview=("JPEG", image, 512))


def training_device() -> torch.device:
    return comfy.model_management.get_torch_device()
