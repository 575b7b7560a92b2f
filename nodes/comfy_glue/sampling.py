"""Sampling the FLUX family with core's own pieces: the model's latent geometry, the family member
ComfyUI detected, ReferenceLatent's conditioning, Flux2Scheduler's sigmas and CFGGuider (what
SamplerCustomAdvanced runs)."""

from __future__ import annotations

import math

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import node_helpers
import torch

from ...lora_ops import flux_family
from ...lora_ops.flow_match import BASE_SHIFT, MAX_SHIFT  # ModelSamplingFlux's / BFL's mu line
from .common import model_family

SAMPLER_NAMES = comfy.samplers.KSampler.SAMPLERS
SCHEDULER_NAMES = comfy.samplers.KSampler.SCHEDULERS


def detected_member(model) -> flux_family.Detection | None:
    """The family member ComfyUI's detection built ``model`` as (None for a non-FLUX model)."""
    try:
        return model_family(model)
    except flux_family.FamilyError:
        return None


def latent_geometry(model) -> tuple[int, int]:
    """(channels, pixels per latent cell) of the model's latents: FLUX.1 16 at /8, FLUX.2 128 at /16.

    ComfyUI 0.33 states the downscale on the latent format; 0.3.75 does not (its Flux2 empty latent
    node hard-codes /16), so there the family registry says it."""
    latent_format = model.get_model_object("latent_format")
    downscale = getattr(latent_format, "spacial_downscale_ratio", None)
    if downscale is None:
        detection = detected_member(model)
        downscale = detection.member.latent_downscale if detection else 8
    return latent_format.latent_channels, downscale


def empty_latent(model, width: int, height: int) -> dict:
    """As core's EmptySD3LatentImage / EmptyFlux2LatentImage for this model: zeros of its channels;
    without a model FLUX.1's 16 channels at 1/8."""
    channels, downscale = latent_geometry(model) if model is not None else (16, 8)
    shape = [1, channels, height // downscale, width // downscale]
    return {"samples": torch.zeros(shape, device=comfy.model_management.intermediate_device())}


def with_guidance(conditioning, guidance: float):
    """What core's FluxGuidance does."""
    return node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})


def patch_flow_shift(model, shift_mode: str, shift: float, width: int, height: int):
    """The model with a sigma shift, patched by core's own nodes: "auto" from the image size (BFL's
    line, ModelSamplingFlux) or a fixed factor ``shift``."""
    # comfy_extras' node modules import ComfyUI's top-level `nodes` (and `av` through comfy_api):
    # imported when called, so the glue loads without them (bench/bench_flux_gguf.py on a GPU box).
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3

    if model.model.model_type == comfy.model_base.ModelType.FLUX:  # guidance-distilled (dev)
        if shift_mode == "auto":
            return ModelSamplingFlux().patch(model, MAX_SHIFT, BASE_SHIFT, width, height)[0]
        mu = math.log(shift)
        # A flat line (base = max = mu) makes core's node use mu whatever the size.
        return ModelSamplingFlux().patch(model, mu, mu, width, height)[0]
    # schnell is a plain flow model (ModelType.FLOW) that BFL samples unshifted: never give it
    # ModelSamplingFlux; a fixed shift other than its own goes through core's ModelSamplingSD3.
    native = model.get_model_object("model_sampling")
    if shift_mode == "auto" or shift == native.shift:
        return model
    return ModelSamplingSD3().patch(model, shift, multiplier=native.multiplier)[0]


def shift_factor(model) -> float:
    """The s = e^mu the model samples with (ModelSamplingFlux stores mu, the flow samplers s)."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        return math.exp(sampling.shift)
    return float(sampling.shift)


def preview_callback(model, steps: int):
    """The sampler callback core's samplers use: progress and latent previews on the node."""
    return latent_preview.prepare_callback(model, steps)


def latent_previewer(model):
    """Core's latent previewer for the model (None when previews are off)."""
    return latent_preview.get_previewer(model.load_device, model.model.latent_format)


def with_reference(conditioning, latent: dict):
    """What core's ReferenceLatent does: the latent appended to the conditioning's reference latents."""
    return node_helpers.conditioning_set_values(conditioning, {"reference_latents": [latent["samples"]]}, append=True)


def flux2_sigmas(steps: int, width: int, height: int, denoise: float = 1.0):
    """Flux2Scheduler's sigmas (mu from the image's 16x16 cells and the step count); below denoise
    1.0 the tail of a longer schedule, as core's BasicScheduler does."""
    from comfy_extras.nodes_flux import get_schedule  # when called: see patch_flow_shift

    total = steps if denoise >= 1.0 else int(steps / denoise)
    return get_schedule(total, round(width * height / (16 * 16)))[-(steps + 1):]


def sample_with_sigmas(model, positive, negative, cfg: float, sampler_name: str, sigmas, latent: dict, seed: int,
                       callback):
    """SamplerCustomAdvanced with RandomNoise(seed) and CFGGuider(model, positive, negative, cfg);
    at cfg 1.0 CFGGuider never evaluates the negative, exactly as BasicGuider."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())


def sample_with_scheduler(model, positive, negative, cfg: float, sampler_name: str, scheduler: str, steps: int,
                          denoise: float, latent: dict, seed: int, callback):
    """KSampler (nodes.common_ksampler) with a caller's callback."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise,
        noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
