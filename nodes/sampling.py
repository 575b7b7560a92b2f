"""FLUX family sampling with core's own pieces (ModelSamplingFlux, FluxGuidance's conditioning values,
ReferenceLatent, Flux2Scheduler, CFGGuider, comfy.sample) and the A/B LoRA compare grid.

Presets come from the family registry (``lora_ops/flux_family.py``, one table per member)."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..lora_ops import flux_family, grid
from ..lora_ops.flow_match import MAX_SHIFT  # the fixed shift's default: BFL's e^1.15
from .comfy_glue import (
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    CORE_DEFAULT_GUIDANCE,
    check_file_choice,
    core_patch_count,
    detected_member,
    flux2_sigmas,
    get_lora_stack,
    has_guidance_input,
    latent_geometry,
    latent_previewer,
    load_lora_entry,
    model_block_weights,
    patch_flow_shift,
    preview_callback,
    progress_bar,
    raise_if_cancelled,
    sample_with_scheduler,
    sample_with_sigmas,
    shift_factor,
    show_progress_text,
    with_guidance,
    with_lora_stack,
    with_reference,
    without_core_patches,
)
from .comfy_glue import empty_latent as model_empty_latent

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
    cfg: float = 1.0  # real CFG with the negative conditioning when > 1
    needs: tuple[str, ...] = ()  # what the preset's graph must supply: "negative", "reference", "inpaint"


# Preset name -> settings values, from the family registry (each member's table; the sources are there).
PRESETS = {name: dict(flux_family.preset(name)) for name in flux_family.PRESET_NAMES}
SHIFT_MODES = ["auto", "fixed", "flux2", "model"]


def shift_mode_for(settings: FluxSamplerSettings, model) -> str:
    """The settings' shift mode, "auto" resolved to the detected family member's own rule."""
    if settings.shift_mode != "auto":
        return settings.shift_mode
    detection = detected_member(model)
    return flux_family.auto_shift_mode(detection) if detection else "auto"


def shifted_model(model, settings: FluxSamplerSettings, width: int, height: int):
    """The model with the sigma shift `settings` ask for. "flux2" (Flux2Scheduler's sigmas, made at
    sampling) and "model" leave the model's own sampling alone."""
    if shift_mode_for(settings, model) in ("flux2", "model"):
        return model
    return patch_flow_shift(model, settings.shift_mode, settings.shift, width, height)


def empty_latent(settings: FluxSamplerSettings, model=None) -> dict:
    """The empty start latent of the settings' size: with the model's channels and downscale (as
    core's EmptySD3LatentImage / EmptyFlux2LatentImage); without a model FLUX.1's 16 at 1/8."""
    return model_empty_latent(model, settings.width, settings.height)


def pixel_size(model, latent: dict) -> tuple[int, int]:
    """(width, height) in pixels of a latent for this model."""
    downscale = latent_geometry(model)[1]
    return latent["samples"].shape[-1] * downscale, latent["samples"].shape[-2] * downscale


def prepare(model, positive, settings: FluxSamplerSettings, latent: dict, reference_latent=None):
    """(model with the shift, conditioning with the guidance and reference), as ModelSamplingFlux +
    FluxGuidance + ReferenceLatent."""
    width, height = pixel_size(model, latent)
    model = shifted_model(model, settings, width, height)
    if reference_latent is not None:
        positive = with_reference(positive, reference_latent)
    if settings.guidance is not None:
        positive = with_guidance(positive, settings.guidance)
    return model, positive


def prepare_negative(negative, reference_latent):
    """The negative with the reference latent too, as core's edit graphs chain ReferenceLatent on
    both; None stays None (the positive then stands in: cfg 1.0 never evaluates it)."""
    if negative is None or reference_latent is None:
        return negative
    return with_reference(negative, reference_latent)


def check_cfg(settings: FluxSamplerSettings, negative) -> None:
    if settings.cfg != 1.0 and negative is None:
        raise ValueError(f"cfg is {settings.cfg:g} (preset {settings.preset}): real CFG needs a negative conditioning; "
                         "connect one to 'negative' (e.g. CLIP Text Encode of a negative or an empty prompt), or "
                         "use cfg 1.0.")


def sample_latent(model, positive, settings: FluxSamplerSettings, seed: int, latent: dict, callback,
                  negative=None) -> dict:
    """KSampler's route (nodes.common_ksampler) or, for the "flux2" shift mode, Flux2Scheduler +
    CFGGuider + SamplerCustomAdvanced's, with a caller's callback."""
    negative = positive if negative is None else negative
    if shift_mode_for(settings, model) == "flux2":
        width, height = pixel_size(model, latent)
        sigmas = flux2_sigmas(settings.steps, width, height, settings.denoise)
        samples = sample_with_sigmas(model, positive, negative, settings.cfg, settings.sampler_name, sigmas, latent,
                                     seed, callback)
    else:
        samples = sample_with_scheduler(model, positive, negative, settings.cfg, settings.sampler_name,
                                        settings.scheduler, settings.steps, settings.denoise, latent, seed, callback)
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


NEEDS_WARNINGS = {
    "reference": ("reference_latents", "it edits a reference image: connect its latent (VAE Encode) to "
                                       "reference_latent, or chain core's ReferenceLatent on the positive"),
    "inpaint": ("concat_latent_image", "it inpaints: make positive, negative and the latent with core's "
                                       "InpaintModelConditioning (image + mask)"),
}


def preset_warning(settings: FluxSamplerSettings, model, positive=None) -> str | None:
    """A warning when the preset is for another family member than the model, or when the
    conditioning lacks what the preset's graph supplies (a reference image, an inpainting mask)."""
    if settings.preset == "custom":
        return None
    detection = detected_member(model)
    misfit = flux_family.preset_misfit(settings.preset, detection) if detection else None
    if misfit:
        return misfit
    for need in settings.needs:
        key, advice = NEEDS_WARNINGS.get(need, (None, None))
        if key and positive is not None and not any(key in entry[1] for entry in positive):
            return f"warning: preset {settings.preset} without a {need} in the conditioning: {advice}."
    return None


def warn_on_node(settings: FluxSamplerSettings, model, node_id, positive=None) -> str | None:
    warning = preset_warning(settings, model, positive)
    if warning:
        log.warning("[FluxQ] %s", warning)
        show_progress_text(warning, node_id)
    return warning


def settings_summary(settings: FluxSamplerSettings, model, positive) -> str:
    mode = shift_mode_for(settings, model)
    schedule = ("Flux2Scheduler sigmas" if mode == "flux2"
                else f"shift {shift_factor(model):.3g} ({settings.shift_mode})")
    text = (f"steps {settings.steps} · {guidance_label(model, positive)} · {settings.sampler_name} / "
            f"{settings.scheduler if mode != 'flux2' else 'flux2'} · {schedule}")
    if settings.cfg != 1.0:
        text += f" · cfg {settings.cfg:g} with the negative"
    return text if settings.denoise == 1.0 else f"{text} · denoise {settings.denoise:g}"


class FluxQSamplerSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FluxQSamplerSettings",
            display_name="FLUX Sampler Settings (FluxQ)",
            category=CATEGORY,
            description="FLUX family sampling settings from a preset (one per family member: FLUX.1 dev, "
                        "Kontext, Krea, schnell, Fill; FLUX.2 dev, klein distilled / base; Chroma) or your own "
                        "values, for FluxQSampler and FluxQCompareGrid.",
            inputs=[
                io.Combo.Input("preset", options=[*PRESETS, "custom"], default="flux-dev",
                               tooltip="flux-dev: 28 steps (diffusers' FluxPipeline default), guidance 3.5, "
                                       "euler / simple (ComfyUI's FLUX template), shift from the image size "
                                       "(BFL, ModelSamplingFlux). flux-schnell: 4 steps (BFL's CLI), no "
                                       "guidance, no shift (1.0). flux-kontext: 30 steps, guidance 2.5, "
                                       "needs a reference_latent (BFL's cli_kontext). flux-krea: 28 steps, "
                                       "guidance 4.5. flux-fill: 20 steps euler / normal, guidance 30, with "
                                       "InpaintModelConditioning. flux2-dev: 20 steps, guidance 4, "
                                       "Flux2Scheduler. flux2-klein-distilled: 4 steps, cfg 1. "
                                       "flux2-klein-base: 20 steps, cfg 5 with a negative. chroma: 35 steps, "
                                       "cfg 5 with a negative. A preset for another member than the loaded "
                                       "model warns on the node. custom: the widgets below. width, height "
                                       "and denoise always apply."),
                io.Int.Input("steps", default=28, min=1, max=10000,
                             tooltip="custom only. 28 is diffusers' FluxPipeline default for dev; ComfyUI's "
                                     "template uses 20; schnell needs 4."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="custom only. FLUX-dev's distilled guidance, as FluxGuidance sets it; "
                                       "3.5 is the default of BFL, diffusers and ComfyUI. CFG stays 1.0."),
                io.Combo.Input("sampler_name", options=SAMPLER_NAMES, default="euler",
                               tooltip="custom only. euler matches BFL's reference sampler."),
                io.Combo.Input("scheduler", options=SCHEDULER_NAMES, default="simple",
                               tooltip="custom only. simple spaces the shifted sigmas like BFL's schedule."),
                io.Combo.Input("shift_mode", options=SHIFT_MODES, default="auto",
                               tooltip="custom only. auto: the model's family rule: FLUX.1 dev, mu from width x "
                                       "height exactly as ModelSamplingFlux (base_shift 0.5, max_shift 1.15), "
                                       "schnell unshifted as in BFL; FLUX.2 as flux2; Chroma as model. fixed: "
                                       "the shift below. flux2: Flux2Scheduler's sigmas (mu from the size and "
                                       "steps; the scheduler widget is not used). model: the model's own "
                                       "sampling, unpatched (as a plain KSampler)."),
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
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="custom only. Real classifier-free guidance with the sampler's negative "
                                       "conditioning (CFGGuider), for models without distilled guidance (klein "
                                       "base, Chroma). 1.0: the negative is never evaluated (FLUX.1 dev, "
                                       "schnell, FLUX.2 dev, klein distilled)."),
            ],
            outputs=[SETTINGS.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, preset, steps, guidance, sampler_name, scheduler, shift_mode, shift, width, height,
                denoise, cfg=1.0) -> io.NodeOutput:
        for name, value in (("width", width), ("height", height)):
            if value % 16:
                raise ValueError(f"{name} {value} is not a multiple of 16 (FLUX packs 2x2 patches of the 8x "
                                 f"smaller latent); use {value - value % 16} or {value - value % 16 + 16}.")
        values = dict(steps=steps, guidance=guidance, sampler_name=sampler_name, scheduler=scheduler,
                      shift_mode=shift_mode, shift=shift, cfg=cfg)
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
            description="Samples a FLUX family model with the settings' schedule, guidance and cfg: the same "
                        "latent as core's graph for the same seed (ModelSamplingFlux + FluxGuidance + KSampler for "
                        "FLUX.1; Flux2Scheduler + FluxGuidance + CFGGuider + SamplerCustomAdvanced for FLUX.2; "
                        "ReferenceLatent for an edit).",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive", tooltip="The prompt. Guidance-distilled models (FLUX.1 dev, "
                                                           "FLUX.2 dev, klein distilled) need no negative: cfg 1.0."),
                SETTINGS.Input("settings"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="Start latent (img2img with denoise < 1). Without it an empty latent "
                                        "of the settings' size is used. The auto shift follows this latent's size."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The negative prompt for real CFG (settings' cfg > 1: klein base, "
                                              "Chroma). Not evaluated at cfg 1.0."),
                io.Latent.Input("reference_latent", optional=True,
                                tooltip="A reference image's latent (VAE Encode) for an edit model (Kontext, FLUX.2 "
                                        "edit), added to the conditioning as core's ReferenceLatent does. For more "
                                        "than one, chain ReferenceLatent nodes on the conditioning."),
            ],
            outputs=[io.Latent.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, settings, seed, latent_image=None, negative=None,
                reference_latent=None) -> io.NodeOutput:
        check_cfg(settings, negative)
        latent = latent_image if latent_image is not None else empty_latent(settings, model)
        model, positive = prepare(model, positive, settings, latent, reference_latent)
        negative = prepare_negative(negative, reference_latent)
        warn_on_node(settings, model, cls.hidden.unique_id if cls.hidden else None, positive)
        callback = preview_callback(model, settings.steps)
        return io.NodeOutput(sample_latent(model, positive, settings, seed, latent, callback, negative))


def compared_stack(model, loras: list[str]):
    """The upstream LoRA stack plus every LoRA in `loras` not applied upstream (loaded once here;
    the glue logs what matched)."""
    stack = get_lora_stack(model)
    for name in loras:
        if name not in stack.names():
            stack = stack.with_lora(load_lora_entry(model, name, 1.0)[0])
    return stack


def row_block_weights(model, plan: grid.GridPlan) -> dict:
    """{block-weight row: its weights for this model (None: every block 1)}, checked against the
    model's block counts before any cell is sampled."""
    return {row.blocks: model_block_weights(model, row.blocks.spec) for row in plan.rows if row.blocks is not None}


def cell_stack(stack, row: grid.GridRow, loras: list[str], block_weights: dict | None = None):
    """A row's stack: the compared LoRAs removed, except the row's own at the row's strength (and the
    row's block weights; without block-weight rows the LoRA keeps those it was applied with)."""
    for name in loras:
        if name != row.lora:
            stack = stack.without(name)
    if row.is_baseline:
        return stack
    stack = stack.with_strength(row.lora, row.strength)
    return stack if row.blocks is None else stack.with_block_weights(row.lora, block_weights[row.blocks])


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
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The negative prompt for real CFG (settings' cfg > 1), the same in "
                                              "every cell."),
                io.Latent.Input("reference_latent", optional=True,
                                tooltip="A reference image's latent for an edit model (Kontext, FLUX.2 edit), as "
                                        "core's ReferenceLatent; the same in every cell."),
                # A socket, not a widget: a new widget would shift every saved workflow's widget values.
                io.String.Input("block_weight_rows", optional=True, force_input=True,
                                tooltip="Block-weight rows (connect a text node, e.g. core's String (Multiline)): "
                                        "one per line, each a preset (all, none, double only, "
                                        "single only, first half, second half) or weights as in FluxQApplyLoRA's "
                                        "block_weights ('d0-9=1, s*=0'), optionally labelled ('faces: s*=0'). "
                                        "Each nonzero strength gets one row per line (set strengths to '1' for one "
                                        "row per line; 0 stays the one baseline row). Empty: no block rows."),
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
                        lora_file=NOT_CONNECTED, block_weight_rows=None) -> bool:
        # Queue-time check of the file names and lists when they are widgets; the cell limit is
        # checked in execute. A connected lora_file arrives as None (its value exists only at run
        # time, maybe a file not yet written): lora_name is then not used, so not checked.
        # ComfyUI repeats a returned message once per argument taken here (four identical errors
        # for one bad list); a raised error is reported once, against the node.
        problem = grid_input_problem(None if lora_file is None else lora_name, lora_name_b, strengths, seeds,
                                     block_weight_rows)
        if problem:
            raise grid.GridInputError(problem)
        return True

    @classmethod
    def execute(cls, model, positive, vae, settings, lora_name, strengths, seeds, lora_name_b=NO_LORA,
                difference=False, lora_file=None, latent_image=None, negative=None,
                reference_latent=None, block_weight_rows="") -> io.NodeOutput:
        if lora_file is not None:
            if (known := check_file_choice("loras", "lora_file", lora_file)) is not True:
                raise ValueError(known)
            lora_name = lora_file
        lora_b = None if lora_name_b in (None, NO_LORA) else lora_name_b
        plan = grid.plan_grid(strengths, seeds, lora_name, lora_b, with_baseline=difference,
                              block_rows_text=block_weight_rows or "")
        block_weights = row_block_weights(model, plan)
        check_cfg(settings, negative)
        latent = start_latent(settings, latent_image, model)
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

        model, positive = prepare(model, positive, settings, latent, reference_latent)
        negative = prepare_negative(negative, reference_latent)
        cells = [(row, seed) for row in plan.rows for seed in plan.seeds]
        warning = warn_on_node(settings, model, node_id, positive)
        clip_note = clip_lora_note(stack, loras, core_patched)
        if clip_note:
            log.warning("[FluxQ] compare grid: %s", clip_note)
            show_progress_text(clip_note, node_id)
        images = render_cells(node_id, model, positive, negative, vae, settings, latent, stack, loras, cells,
                              block_weights)

        header = header_lines(model, positive, settings, latent, plan, lora_name, lora_b, stack, loras, core_patched,
                              block_weights)
        header += [note for note in (clip_note, warning) if note]
        shown, captions = images, None
        if difference:
            baselines = images[[plan.baseline_cell(i) for i in range(len(cells))]]
            shown, means, gain = grid.difference_images(images, baselines)
            captions = [None if row.is_baseline else f"mean diff {mean:.4f}" for (row, _), mean in zip(cells, means)]
            header.append(f"difference view: |cell - baseline| brightened x{gain:.1f}; label = mean difference (0-1)")
        grid_image = grid.draw_grid(list(shown), len(plan.rows), len(plan.seeds), plan.row_labels(),
                                    plan.column_labels(), header, captions)
        return io.NodeOutput(grid_image, images, ui=compare_view_payload(images, plan, cells, header))


def grid_input_problem(lora_name, lora_name_b, strengths, seeds, block_weight_rows=None) -> str | None:
    """What is wrong with the grid's widget values (None: a value that is not given or is a link)."""
    for input_name, value, extra in (("lora_name", lora_name, ()), ("lora_name_b", lora_name_b, (NO_LORA,))):
        if value is not None and (known := check_file_choice("loras", input_name, value, extra)) is not True:
            return known
    try:
        if strengths is not None:
            grid.parse_strengths(strengths)
        if seeds is not None:
            grid.parse_seeds(seeds)
        if isinstance(block_weight_rows, str):
            grid.parse_grid_block_rows(block_weight_rows)
    except grid.GridInputError as error:
        return str(error)
    return None


def start_latent(settings: FluxSamplerSettings, latent_image: dict | None, model) -> dict:
    """The grid's one start latent; refused where the cells would silently denoise from zeros."""
    if latent_image is None:
        if settings.denoise < 1.0:
            raise ValueError(f"the settings' denoise is {settings.denoise:g}, but the grid has no latent_image to "
                             "start from (it would denoise an empty latent): connect one (e.g. VAE Encode of your "
                             "image) or set denoise to 1.0.")
        return empty_latent(settings, model)
    batch = latent_image["samples"].shape[0]
    if batch != 1:
        raise ValueError(f"latent_image holds {batch} latents; the grid starts every cell from one: pick it with "
                         "'Latent From Batch'.")
    return latent_image


def render_cells(node_id, model, positive, negative, vae, settings, latent, stack, loras, cells,
                 block_weights: dict | None = None) -> torch.Tensor:
    """Samples and decodes each cell in turn; the model stays loaded and only the LoRA stack changes."""
    previewer = latent_previewer(model)
    progress = progress_bar(len(cells) * settings.steps)
    images = []
    started = time.perf_counter()
    for index, (row, seed) in enumerate(cells):
        raise_if_cancelled()
        show_progress_text(f"cell {index + 1}/{len(cells)}: {row.label}, seed {seed}", node_id)

        def callback(step, x0, x, total_steps, index=index):
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer else None
            progress.update_absolute(index * total_steps + step + 1, len(cells) * total_steps, preview)

        cell_model = with_lora_stack(model, cell_stack(stack, row, loras, block_weights))
        samples = sample_latent(cell_model, positive, settings, seed, latent, callback, negative)["samples"]
        # Decode now and keep only CPU pixels, so a big grid holds no latents or device memory.
        images.append(vae.decode(samples)[0].cpu())
    seconds = time.perf_counter() - started
    show_progress_text(f"{len(cells)} cells in {seconds:.1f} s ({seconds / len(cells):.1f} s per cell)", node_id)
    return torch.stack(images)


def clip_lora_note(stack, loras, core_patched: int) -> str | None:
    """What the grid cannot vary: the text-encoder part of a compared LoRA, baked into the positive
    conditioning by the CLIP that encoded it (FluxQApplyLoRA with a CLIP, or core LoraLoader)."""
    on_clip = [entry for entry in stack.entries if entry.name in loras and entry.clip_strength is not None]
    if on_clip:
        parts = ", ".join(f"{e.name} @ {grid.strength_label(e.clip_strength)}" for e in on_clip)
        return (f"note: the CLIP part of {parts} was applied upstream (FluxQApplyLoRA with a CLIP): a prompt encoded "
                "by that CLIP carries it in every cell at that strength, the strength-0 row included, which is then "
                "not the base model. For a true baseline encode the prompt with the CLIP from before Apply LoRA.")
    if core_patched:
        return ("note: core LoRA patches on the input MODEL (LoraLoader...) were left out of the cells, but a prompt "
                "encoded by that loader's CLIP keeps the LoRA's text-encoder part in every cell at its strength, the "
                "strength-0 row included. For a true baseline encode the prompt with the CLIP from before the loader.")
    return None


def header_lines(model, positive, settings, latent, plan, lora_a, lora_b, stack, loras, core_patched: int,
                 block_weights: dict | None = None) -> list[str]:
    seeds = ", ".join(str(seed) for seed in plan.seeds)
    width, height = pixel_size(model, latent)
    lines = [f"LoRA: {lora_a}" if lora_b is None else f"A: {lora_a}   B: {lora_b}",
             f"{settings_summary(settings, model, positive)} · {width}x{height} · seeds {seeds}"]
    if block_weights:
        rows = ", ".join(f"{blocks.label} = {'all' if weights is None else weights.describe()}"
                         for blocks, weights in block_weights.items())
        lines.append(f"block weights per row (unnamed blocks 1): {rows}")
    else:
        upstream = [e for e in stack.entries if e.name in loras and e.block_weights is not None]
        lines += [f"{e.name}: block weights {e.block_weights.describe()} (from FluxQApplyLoRA) in every row"
                  for e in upstream]
    others = [entry for entry in stack.entries if entry.name not in loras]
    # Only a row that exists is called the baseline (strengths "-10, 10" have none).
    if any(row.is_baseline for row in plan.rows):
        base = "baseline (" + ("no LoRA" if lora_b else "strength 0") + "): the base model"
    else:
        base = "no strength-0 row; every row: the base model + the compared LoRA"
    base += "".join(f" + {e.name} @ {grid.strength_label(e.strength)}" for e in others)
    if core_patched:
        base += f", without the core LoRA patches of {core_patched} weights on the input MODEL"
    lines.append(base)
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
