"""FLUX sampling with core's own pieces (ModelSamplingFlux, FluxGuidance's conditioning values,
comfy.sample) and the A/B LoRA compare grid."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import node_helpers
import torch
from comfy_api.latest import io, ui
from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3

from ..lora_ops import grid
from ..lora_ops.flow_match import BASE_SHIFT, MAX_SHIFT  # ModelSamplingFlux's / BFL's mu line
from .comfy_glue import (
    CORE_DEFAULT_GUIDANCE,
    check_file_choice,
    core_patch_count,
    get_lora_stack,
    has_guidance_input,
    load_lora_entry,
    show_progress_text,
    with_lora_stack,
    without_core_patches,
)

log = logging.getLogger("fluxq")

CATEGORY = "Flux QLoRA Lab/sampling"
SETTINGS = io.Custom("FLUX_SAMPLER_SETTINGS")
NO_LORA = "none"
NOT_CONNECTED = object()  # validate_inputs' default for an optional link that is absent



@dataclass(frozen=True)
class FluxSamplerSettings:
    """What FluxQSamplerSettings hands to the sampler and the grid (the FLUX_SAMPLER_SETTINGS value)."""

    preset: str
    steps: int
    guidance: float | None  # None leaves the conditioning alone: schnell has no guidance input
    sampler_name: str
    scheduler: str
    shift_mode: str  # "auto": from the image size as ModelSamplingFlux; "fixed": `shift`
    shift: float  # the sigma-shift factor s = e^mu
    width: int
    height: int
    denoise: float


PRESETS = {
    # diffusers' FluxPipeline: 28 steps, guidance 3.5; BFL and ComfyUI's template: euler, simple,
    # resolution-dependent shift.
    "flux-dev": dict(steps=28, guidance=3.5, sampler_name="euler", scheduler="simple", shift_mode="auto"),
    # BFL's CLI: 4 steps, unshifted schedule (get_schedule(shift=False)); schnell has no guidance input.
    "flux-schnell": dict(steps=4, guidance=None, sampler_name="euler", scheduler="simple",
                         shift_mode="fixed", shift=1.0),
}


def patch_flow_shift(model, settings: FluxSamplerSettings, width: int, height: int):
    """The model with the sigma shift `settings` ask for, patched by core's own nodes."""
    if model.model.model_type == comfy.model_base.ModelType.FLUX:  # guidance-distilled (dev)
        if settings.shift_mode == "auto":
            return ModelSamplingFlux().patch(model, MAX_SHIFT, BASE_SHIFT, width, height)[0]
        mu = math.log(settings.shift)
        # A flat line (base = max = mu) makes core's node use mu whatever the size.
        return ModelSamplingFlux().patch(model, mu, mu, width, height)[0]
    # schnell is a plain flow model (ModelType.FLOW) that BFL samples unshifted: never give it
    # ModelSamplingFlux; a fixed shift other than its own goes through core's ModelSamplingSD3.
    native = model.get_model_object("model_sampling")
    if settings.shift_mode == "auto" or settings.shift == native.shift:
        return model
    return ModelSamplingSD3().patch(model, settings.shift, multiplier=native.multiplier)[0]


def shift_factor(model) -> float:
    """The s = e^mu the model samples with (ModelSamplingFlux stores mu, the flow samplers s)."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        return math.exp(sampling.shift)
    return float(sampling.shift)


def empty_latent(settings: FluxSamplerSettings) -> dict:
    # As core's EmptySD3LatentImage, which FLUX templates use: 16 channels at 1/8 size.
    shape = [1, 16, settings.height // 8, settings.width // 8]
    return {"samples": torch.zeros(shape, device=comfy.model_management.intermediate_device())}


def prepare(model, positive, settings: FluxSamplerSettings, latent: dict):
    """(model with the shift, conditioning with the guidance), as ModelSamplingFlux + FluxGuidance."""
    height, width = latent["samples"].shape[-2] * 8, latent["samples"].shape[-1] * 8
    model = patch_flow_shift(model, settings, width, height)
    if settings.guidance is not None:
        positive = node_helpers.conditioning_set_values(positive, {"guidance": settings.guidance})
    return model, positive


def sample_latent(model, positive, settings: FluxSamplerSettings, seed: int, latent: dict, callback) -> dict:
    """nodes.common_ksampler at cfg 1.0 with a caller's callback. FLUX is guidance-distilled: at
    cfg 1.0 core never evaluates the negative, so the positive stands in for it."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    samples = comfy.sample.sample(
        model, noise, settings.steps, 1.0, settings.sampler_name, settings.scheduler, positive, positive,
        latent_image, denoise=settings.denoise, noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )
    return {**latent, "samples": samples}


def guidance_label(model, positive) -> str:
    """The guidance the model actually gets: none without a guidance input (schnell), else the
    conditioning's value, or core's default when the conditioning sets none."""
    if not has_guidance_input(model):
        return "no guidance (the model has no guidance input)"
    values = sorted({entry[1].get("guidance", CORE_DEFAULT_GUIDANCE) for entry in positive})
    label = "guidance " + ", ".join(f"{value:g}" for value in values)
    if all("guidance" not in entry[1] for entry in positive):
        label += " (ComfyUI's default: nothing set it)"
    return label


def preset_warning(settings: FluxSamplerSettings, model) -> str | None:
    """A warning when a dev/schnell preset meets the other kind of model."""
    dev_model = has_guidance_input(model)
    if settings.preset == "flux-schnell" and dev_model:
        return ("warning: preset flux-schnell on a dev (guidance-distilled) model: 4 unshifted steps, and the model "
                "still gets guidance; use flux-dev (or custom).")
    if settings.preset == "flux-dev" and not dev_model:
        return ("warning: preset flux-dev on a schnell model (no guidance input): the guidance has no effect and "
                "its 28 steps are for dev; use flux-schnell (or custom).")
    return None


def warn_on_node(settings: FluxSamplerSettings, model, node_id) -> str | None:
    warning = preset_warning(settings, model)
    if warning:
        log.warning("[FluxQ] %s", warning)
        show_progress_text(warning, node_id)
    return warning


def settings_summary(settings: FluxSamplerSettings, model, positive) -> str:
    text = (f"steps {settings.steps} · {guidance_label(model, positive)} · {settings.sampler_name} / "
            f"{settings.scheduler} · shift {shift_factor(model):.3g} ({settings.shift_mode})")
    return text if settings.denoise == 1.0 else f"{text} · denoise {settings.denoise:g}"


class FluxQSamplerSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQSamplerSettings",
            display_name="FLUX Sampler Settings (FluxQ)",
            category=CATEGORY,
            description="FLUX sampling settings from a preset (dev or schnell) or your own values, for "
                        "FluxQSampler and FluxQCompareGrid.",
            inputs=[
                io.Combo.Input("preset", options=[*PRESETS, "custom"], default="flux-dev",
                               tooltip="flux-dev: 28 steps (diffusers' FluxPipeline default), guidance 3.5, "
                                       "euler / simple (ComfyUI's FLUX template), shift from the image size "
                                       "(BFL, ModelSamplingFlux). flux-schnell: 4 steps (BFL's CLI), no "
                                       "guidance, no shift (1.0). custom: the widgets below. width, height "
                                       "and denoise always apply."),
                io.Int.Input("steps", default=28, min=1, max=10000,
                             tooltip="custom only. 28 is diffusers' FluxPipeline default for dev; ComfyUI's "
                                     "template uses 20; schnell needs 4."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="custom only. FLUX-dev's distilled guidance, as FluxGuidance sets it; "
                                       "3.5 is the default of BFL, diffusers and ComfyUI. CFG stays 1.0."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="custom only. euler matches BFL's reference sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="custom only. simple spaces the shifted sigmas like BFL's schedule."),
                io.Combo.Input("shift_mode", options=["auto", "fixed"], default="auto",
                               tooltip="custom only. auto: for dev, mu from width x height exactly as "
                                       "ModelSamplingFlux (base_shift 0.5, max_shift 1.15); schnell stays "
                                       "unshifted as in BFL. fixed: the shift below."),
                io.Float.Input("shift", default=round(math.exp(MAX_SHIFT), 4), min=0.01, max=100.0, step=0.01,
                               tooltip="custom + fixed only: the sigma-shift factor s = e^mu. 3.1582 = e^1.15 is "
                                       "dev's auto value at 1024x1024 (and kohya's discrete_flow_shift); "
                                       "1.0 = no shift."),
                io.Int.Input("width", default=1024, min=16, max=16384, step=16,
                             tooltip="Image width; a multiple of 16 (8x VAE, 2x2 patches)."),
                io.Int.Input("height", default=1024, min=16, max=16384, step=16,
                             tooltip="Image height; a multiple of 16 (8x VAE, 2x2 patches)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="As KSampler's denoise; below 1.0 only makes sense with a latent_image."),
            ],
            outputs=[SETTINGS.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, preset, steps, guidance, sampler_name, scheduler, shift_mode, shift, width, height,
                denoise) -> io.NodeOutput:
        for name, value in (("width", width), ("height", height)):
            if value % 16:
                raise ValueError(f"{name} {value} is not a multiple of 16 (FLUX packs 2x2 patches of the 8x "
                                 f"smaller latent); use {value - value % 16} or {value - value % 16 + 16}.")
        values = dict(steps=steps, guidance=guidance, sampler_name=sampler_name, scheduler=scheduler,
                      shift_mode=shift_mode, shift=shift)
        values.update(PRESETS.get(preset, {}))
        return io.NodeOutput(FluxSamplerSettings(preset=preset, width=width, height=height, denoise=denoise,
                                                 **values))


class FluxQSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQSampler",
            display_name="FLUX Sampler (FluxQ)",
            category=CATEGORY,
            description="Samples FLUX with the settings' shift and guidance: the same latent as "
                        "ModelSamplingFlux + FluxGuidance + KSampler (cfg 1.0) for the same seed.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="FLUX needs no negative: it samples at cfg 1.0."),
                SETTINGS.Input("settings"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="Start latent (img2img with denoise < 1). Without it an empty latent "
                                        "of the settings' size is used. The auto shift follows this latent's size."),
            ],
            outputs=[io.Latent.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, settings, seed, latent_image=None) -> io.NodeOutput:
        warn_on_node(settings, model, cls.hidden.unique_id if cls.hidden else None)
        latent = latent_image if latent_image is not None else empty_latent(settings)
        model, positive = prepare(model, positive, settings, latent)
        callback = latent_preview.prepare_callback(model, settings.steps)
        return io.NodeOutput(sample_latent(model, positive, settings, seed, latent, callback))


def compared_stack(model, loras: list[str]):
    """The upstream LoRA stack plus every LoRA in `loras` not applied upstream (loaded once here;
    the glue logs what matched)."""
    stack = get_lora_stack(model)
    for name in loras:
        if name not in stack.names():
            stack = stack.with_lora(load_lora_entry(model, name, 1.0)[0])
    return stack


def cell_stack(stack, row: grid.GridRow, loras: list[str]):
    """A row's stack: the compared LoRAs removed, except the row's own at the row's strength."""
    for name in loras:
        if name != row.lora:
            stack = stack.without(name)
    return stack if row.is_baseline else stack.with_strength(row.lora, row.strength)


class FluxQCompareGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        loras = folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="FluxQCompareGrid",
            display_name="FLUX LoRA Compare Grid (FluxQ)",
            category=CATEGORY,
            description="Renders a LoRA at several strengths (rows) and seeds (columns) with one model load; "
                        "the node shows an interactive A/B compare view of any two cells.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Vae.Input("vae"),
                SETTINGS.Input("settings"),
                io.Combo.Input("lora_name", options=loras,
                               tooltip="The LoRA to vary. If it is already applied upstream (FluxQApplyLoRA) its "
                                       "strength is varied; otherwise it is loaded once here."),
                io.String.Input("strengths", default="0, 0.5, 1.0",
                                tooltip="LoRA strengths, one row each, separated by ', ' or spaces; decimals "
                                        "with a point (0.75; '0,75' is refused as ambiguous); -10 to 10. 0 is "
                                        "the render without the LoRA."),
                io.String.Input("seeds", default="0, 1",
                                tooltip="Seeds, one column each. Every cell of a column starts from the same noise."),
                io.Combo.Input("lora_name_b", options=[NO_LORA, *loras], default=NO_LORA, optional=True,
                               tooltip="A second LoRA for LoRA-vs-LoRA: each strength gets an A row and a B row, "
                                       "each LoRA alone on top of the upstream ones."),
                io.Boolean.Input("difference", default=False, optional=True,
                                 tooltip="Show each cell as |cell - baseline| (same seed, without the compared "
                                         "LoRAs), brightened, with its mean difference as a label."),
                io.String.Input("lora_file", optional=True, force_input=True,
                                tooltip="A LoRA file name in models/loras handed on by another node (FluxQTrainLoRA's "
                                        "lora_file); when connected it replaces lora_name."),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="One start latent for every cell (img2img: the settings' denoise < 1 needs "
                                        "it). Without it an empty latent of the settings' size; the auto shift "
                                        "follows this latent's size."),
            ],
            outputs=[
                io.Image.Output(display_name="grid"),
                io.Image.Output(display_name="cells", tooltip="Every cell, row by row, as an image batch."),
            ],
            hidden=[io.Hidden.unique_id],
            # An output node so a re-queue with everything cached still re-sends the compare view's data.
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, lora_name=None, lora_name_b=None, strengths=None, seeds=None,
                        lora_file=NOT_CONNECTED) -> bool | str:
        # Queue-time check of the file names and lists when they are widgets; the cell limit is
        # checked in execute. A connected lora_file arrives as None (its value exists only at run
        # time, maybe a file not yet written): lora_name is then not used, so not checked.
        if lora_file is None:
            lora_name = None
        for input_name, value, extra in (("lora_name", lora_name, ()), ("lora_name_b", lora_name_b, (NO_LORA,))):
            if value is not None and (known := check_file_choice("loras", input_name, value, extra)) is not True:
                return known
        try:
            if strengths is not None:
                grid.parse_strengths(strengths)
            if seeds is not None:
                grid.parse_seeds(seeds)
        except grid.GridInputError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, model, positive, vae, settings, lora_name, strengths, seeds, lora_name_b=NO_LORA,
                difference=False, lora_file=None, latent_image=None) -> io.NodeOutput:
        if lora_file is not None:
            if (known := check_file_choice("loras", "lora_file", lora_file)) is not True:
                raise ValueError(known)
            lora_name = lora_file
        lora_b = None if lora_name_b in (None, NO_LORA) else lora_name_b
        plan = grid.plan_grid(strengths, seeds, lora_name, lora_b, with_baseline=difference)
        latent = start_latent(settings, latent_image)
        loras = [lora_name] if lora_b is None else [lora_name, lora_b]
        stack = compared_stack(model, loras)
        node_id = cls.hidden.unique_id if cls.hidden else None  # None when called outside an executor
        # Core patches (e.g. the same LoRA through LoraLoaderModelOnly) would ride in every cell, so
        # "strength 0" would not be the base: every cell samples the unpatched model instead.
        core_patched = core_patch_count(model)
        if core_patched:
            model = without_core_patches(model)
            note = (f"{core_patched} weights of the input MODEL carry core LoRA patches (LoraLoader...): they are "
                    "left out of every cell; apply LoRAs with FluxQApplyLoRA to keep them in all cells.")
            log.warning("[FluxQ] compare grid: %s", note)
            show_progress_text(note, node_id)

        model, positive = prepare(model, positive, settings, latent)
        cells = [(row, seed) for row in plan.rows for seed in plan.seeds]
        warning = warn_on_node(settings, model, node_id)
        images = render_cells(node_id, model, positive, vae, settings, latent, stack, loras, cells)

        header = header_lines(model, positive, settings, latent, plan, lora_name, lora_b, stack, loras, core_patched)
        if warning:
            header.append(warning)
        shown, captions = images, None
        if difference:
            baselines = images[[plan.baseline_cell(i) for i in range(len(cells))]]
            shown, means, gain = grid.difference_images(images, baselines)
            captions = [None if row.is_baseline else f"mean diff {mean:.4f}" for (row, _), mean in zip(cells, means)]
            header.append(f"difference view: |cell - baseline| brightened x{gain:.1f}; label = mean difference (0-1)")
        grid_image = grid.draw_grid(list(shown), len(plan.rows), len(plan.seeds), plan.row_labels(),
                                    plan.column_labels(), header, captions)
        return io.NodeOutput(grid_image, images, ui=compare_view_payload(images, plan, cells, header))


def start_latent(settings: FluxSamplerSettings, latent_image: dict | None) -> dict:
    """The grid's one start latent; refused where the cells would silently denoise from zeros."""
    if latent_image is None:
        if settings.denoise < 1.0:
            raise ValueError(f"the settings' denoise is {settings.denoise:g}, but the grid has no latent_image to "
                             "start from (it would denoise an empty latent): connect one (e.g. VAE Encode of your "
                             "image) or set denoise to 1.0.")
        return empty_latent(settings)
    batch = latent_image["samples"].shape[0]
    if batch != 1:
        raise ValueError(f"latent_image holds {batch} latents; the grid starts every cell from one: pick it with "
                         "'Latent From Batch'.")
    return latent_image


def render_cells(node_id, model, positive, vae, settings, latent, stack, loras, cells) -> torch.Tensor:
    """Samples and decodes each cell in turn; the model stays loaded and only the LoRA stack changes."""
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    progress = comfy.utils.ProgressBar(len(cells) * settings.steps)
    images = []
    started = time.perf_counter()
    for index, (row, seed) in enumerate(cells):
        comfy.model_management.throw_exception_if_processing_interrupted()
        show_progress_text(f"cell {index + 1}/{len(cells)}: {row.label}, seed {seed}", node_id)

        def callback(step, x0, x, total_steps, index=index):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            progress.update_absolute(index * total_steps + step + 1, len(cells) * total_steps, preview)

        cell_model = with_lora_stack(model, cell_stack(stack, row, loras))
        samples = sample_latent(cell_model, positive, settings, seed, latent, callback)["samples"]
        # Decode now and keep only CPU pixels, so a big grid holds no latents or device memory.
        images.append(vae.decode(samples)[0].cpu())
    seconds = time.perf_counter() - started
    show_progress_text(f"{len(cells)} cells in {seconds:.1f} s ({seconds / len(cells):.1f} s per cell)", node_id)
    return torch.stack(images)


def header_lines(model, positive, settings, latent, plan, lora_a, lora_b, stack, loras, core_patched: int) -> list[str]:
    seeds = ", ".join(str(seed) for seed in plan.seeds)
    height, width = latent["samples"].shape[-2] * 8, latent["samples"].shape[-1] * 8
    lines = [f"LoRA: {lora_a}" if lora_b is None else f"A: {lora_a}   B: {lora_b}",
             f"{settings_summary(settings, model, positive)} · {width}x{height} · seeds {seeds}"]
    others = [entry for entry in stack.entries if entry.name not in loras]
    baseline = "baseline (" + ("no LoRA" if lora_b else "strength 0") + "): the base model"
    baseline += "".join(f" + {e.name} @ {grid.strength_label(e.strength)}" for e in others)
    if core_patched:
        baseline += f", without the core LoRA patches of {core_patched} weights on the input MODEL"
    lines.append(baseline)
    return lines


def compare_view_payload(images: torch.Tensor, plan: grid.GridPlan, cells, header: list[str]) -> dict:
    """Cells saved to the temp folder like PreviewImage, with the labels js/fluxq_compare.js needs."""
    prefix = "fluxq_compare_" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
    saved = ui.ImageSaveHelper.save_images(images, prefix, io.FolderType.temp, cls=None, compress_level=1)
    entries = [
        {**result, "label": f"{row.label} · seed {seed}", "row": index // len(plan.seeds),
         "col": index % len(plan.seeds)}
        for index, (result, (row, seed)) in enumerate(zip(saved, cells))
    ]
    layout = {"title": header[0], "header": header, "rows": plan.row_labels(), "cols": plan.column_labels()}
    return {"fluxq_cells": entries, "fluxq_grid": [layout]}


NODES = [FluxQSamplerSettings, FluxQSampler, FluxQCompareGrid]
