"""The FLUX family registry: the one place that knows how the members differ.

One ``Member`` per model a user downloads (FLUX.1 dev / schnell / Kontext / Krea / Fill, FLUX.2
dev / klein 4B / klein 9B, Chroma). Nodes read it instead of branching on a family name:

- the loader (``nodes/comfy_glue/loading.py``) asks ``identify`` which member ComfyUI's own
  detection found (class name + unet config), refuses what is not in ``ALLOWED_COMFY_CLASSES`` and
  what the running ComfyUI cannot build (``refusal_for_comfyui``), and tells the user which
  members share identical tensors (only the user knows which one the file is);
- the LoRA glue asks ``lora_family_mismatch`` whether a LoRA's keys belong to another member;
- the trainer writes ``Member.base_model`` into saved LoRAs;
- ``scripts/make_tiny_models.py`` builds ``Member.tiny`` configs;
- the sampler presets live in ``Member.presets`` (filled by the sampling side).

Facts are from ComfyUI 0.33.0's ``model_detection.py`` / ``supported_models.py`` and the released
checkpoints (see the shared FLUX_FAMILY notes). No ComfyUI import here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from .errors import user_facing

# Generations: LoRAs are compatible only within one (same block layout and module names).
FLUX1, FLUX2, CHROMA = "FLUX.1", "FLUX.2", "Chroma"
BASE_MODEL_VERSIONS = MappingProxyType({FLUX1: "flux1", FLUX2: "flux2", CHROMA: "chroma"})
# kohya's ``ss_network_module`` per generation: sd-scripts' FLUX.1 module (its Chroma mode trains the
# same module names), musubi-tuner's FLUX.2 one.
NETWORK_MODULES = MappingProxyType({FLUX1: "networks.lora_flux", FLUX2: "networks.lora_flux_2",
                                    CHROMA: "networks.lora_flux"})


@dataclass(frozen=True)
class Member:
    id: str
    label: str
    generation: str
    comfy_class: str  # ComfyUI's supported_models class its detection picks
    # what else the detected unet config must say (keys of ComfyUI's unet_config)
    requires: Mapping[str, object]
    hidden_size: int  # released size; a file of another width is "not a released size"
    double_blocks: int
    single_blocks: int
    latent_channels: int
    latent_downscale: int
    context_dim: int  # width of the text encoder's output the model reads (txt_in)
    guidance: bool  # a distilled-guidance embedding (guidance_in)
    pooled_vector: bool  # a CLIP-L pooled vector input (vector_in)
    base_model: str  # written as ss_sd_model_name / modelspec.architecture into saved LoRAs
    # members whose files hold the same tensor names and shapes: a file cannot tell them apart
    same_tensors_as: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()  # checkpoints with identical tensors inside this member
    min_comfyui: tuple[int, int, int] = (0, 3, 75)
    tiny: Mapping[str, object] = field(default_factory=dict)  # ComfyUI model params of the test model
    # ComfyUI's module class the tiny model is built from (named, never imported here)
    comfy_model: str = "comfy.ldm.flux.model.Flux"
    presets: Mapping[str, Mapping[str, object]] = field(default_factory=dict)  # sampler presets
    # Training (FluxQTrainLoRA). The value the guidance input gets (None: the forward takes none);
    # the timestep shift (a ``flow_match.SHIFT_SCHEDULES`` name); the sample preset when no
    # settings are connected; a note the node shows; why it cannot be trained (None: it can).
    train_guidance: float | None = None
    train_shift: str = "flux1"
    train_preset: str | None = None
    train_note: str | None = None
    train_wrong_presets: tuple[str, ...] = ()  # sample presets that say the file is the wrong checkpoint to train
    train_refusal: str | None = None
    # its text encoders (FluxQLoadTextEncodersGGUF `type`): CLIP-L + T5 for FLUX.1, T5 alone for
    # Chroma, Mistral for FLUX.2 [dev], Qwen3 for klein
    text_encoder: str = "flux1"

    def full_params(self) -> dict:
        """ComfyUI model-class parameters of the released model: the tiny config's architecture
        switches (patch size, activations, biases, rope axes) at the released sizes."""
        tiny = self.tiny or next(m.tiny for m in MEMBERS if m.generation == self.generation and m.tiny
                                 and m.guidance == self.guidance)
        return {**tiny, "hidden_size": self.hidden_size, "num_heads": self.hidden_size // 128,
                "depth": self.double_blocks, "depth_single_blocks": self.single_blocks,
                "context_in_dim": self.context_dim, "guidance_embed": self.guidance}

    @property
    def base_model_version(self) -> str:
        """kohya's ``ss_base_model_version`` for LoRAs trained on this member."""
        return BASE_MODEL_VERSIONS[self.generation]

    @property
    def network_module(self) -> str:
        """kohya's ``ss_network_module`` for LoRAs trained on this member."""
        return NETWORK_MODULES[self.generation]


# From this ComfyUI on, detection derives the head count from the width (hidden // 128); 0.3.75
# fixes 24 heads for FLUX.1 / Chroma and 48 for FLUX.2, so it builds only the released widths.
ANY_WIDTH_COMFYUI = (0, 33, 0)


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(d)


# --- tiny test-model configs (ComfyUI model-class parameters) ---------------------------------
# FLUX.1: ComfyUI 0.3.75 fixes 24 heads x 128, so dev/schnell stay 3072 wide (the suite's tiny
# models run on both ComfyUIs); depth 1 + 1; CLIP-L width text.
_TINY_FLUX1 = {"in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 768, "hidden_size": 3072,
               "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56],
               "theta": 10000, "patch_size": 2, "qkv_bias": True}
# FLUX.2 (and Fill) as 0.33.0 detects it: heads = width // 128, so width 128 is one head.
_TINY_FLUX2 = {"in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 768, "hidden_size": 128,
               "mlp_ratio": 3.0, "num_heads": 1, "depth": 1, "depth_single_blocks": 1, "axes_dim": [32, 32, 32, 32],
               "theta": 2000, "patch_size": 1, "qkv_bias": False, "ops_bias": False, "global_modulation": True,
               "mlp_silu_act": True, "txt_ids_dims": [3], "default_ref_method": "index", "ref_index_scale": 10.0}
# Chroma's approximator is fixed-size (in 64, hidden 5120, 5 layers, out 3072), so the width too.
_TINY_CHROMA = {"in_channels": 64, "out_channels": 64, "context_in_dim": 768, "hidden_size": 3072, "mlp_ratio": 4.0,
                "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000,
                "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5}

_FLUX1_COMMON = {"generation": FLUX1, "hidden_size": 3072, "double_blocks": 19, "single_blocks": 38, "latent_channels": 16,
                 "latent_downscale": 8, "pooled_vector": True, "context_dim": 4096,  # T5-XXL
                 "train_shift": "flux1"}
# FLUX.1 [dev] LoRAs are trained with the distilled guidance fixed at 1.0 (kohya's sd-scripts advice for dev).
_DEV_TRAINING = {"train_guidance": 1.0, "train_preset": "flux-dev"}
_FLUX2_COMMON = {"generation": FLUX2, "comfy_class": "Flux2", "latent_channels": 128, "latent_downscale": 16,
                 "pooled_vector": False, "train_shift": "flux2"}
# klein: ai-toolkit trains klein LoRAs on the undistilled base checkpoint (a LoRA trained on the distilled one is
# reported to draw grey images); the file cannot tell the two apart, so the node says so.
_KLEIN_TRAINING = {"text_encoder": "klein", "train_preset": "flux2-klein-base", "train_wrong_presets": ("flux2-klein-distilled",), "train_note": (
    "train klein LoRAs on the klein BASE checkpoint (a LoRA trained on distilled klein is reported to draw grey "
    "images); the LoRA then works on base and distilled alike")}
_DEV_GROUP = ("flux1-dev", "flux1-kontext-dev", "flux1-krea-dev")
_KLEIN_VARIANTS = ("distilled", "base")

MEMBERS: tuple[Member, ...] = (
    Member(id="flux1-dev", label="FLUX.1 [dev]", comfy_class="Flux", requires=_frozen({"in_channels": 16}),
           guidance=True, base_model="flux1-dev", same_tensors_as=_DEV_GROUP,
           tiny=_frozen({**_TINY_FLUX1, "guidance_embed": True}),
           **_FLUX1_COMMON, **_DEV_TRAINING),
    Member(id="flux1-kontext-dev", label="FLUX.1 Kontext [dev]", comfy_class="Flux",
           requires=_frozen({"in_channels": 16}), guidance=True, base_model="flux1-kontext-dev",
           same_tensors_as=_DEV_GROUP, **_FLUX1_COMMON, **_DEV_TRAINING),
    Member(id="flux1-krea-dev", label="FLUX.1 Krea [dev]", comfy_class="Flux",
           requires=_frozen({"in_channels": 16}), guidance=True, base_model="flux1-krea-dev",
           same_tensors_as=_DEV_GROUP, **_FLUX1_COMMON, **_DEV_TRAINING),
    Member(id="flux1-schnell", label="FLUX.1 [schnell]", comfy_class="FluxSchnell",
           requires=_frozen({"in_channels": 16}), guidance=False, base_model="flux1-schnell",
           tiny=_frozen({**_TINY_FLUX1, "guidance_embed": False}), train_preset="flux-schnell", **_FLUX1_COMMON),
    # Fill: img_in is 384 wide (16 latent + 16 masked-image + 4x4 mask channels, 2x2 patches)
    Member(id="flux1-fill-dev", label="FLUX.1 Fill [dev]", comfy_class="FluxInpaint",
           requires=_frozen({"in_channels": 96}), guidance=True, base_model="flux1-fill-dev",
           tiny=_frozen({**_TINY_FLUX1, "in_channels": 96, "guidance_embed": True, "hidden_size": 128,
                         "num_heads": 1}), **_FLUX1_COMMON,
           train_refusal="FLUX.1 Fill [dev] is trained on inpainting triples (image, mask, masked image), which "
                         "FluxQTrainLoRA does not take; train on FLUX.1 [dev] instead (its LoRAs load on Fill)"),
    # context: three hidden-state taps of the text encoder side by side (Mistral-Small 5120, Qwen3-4B
    # 2560, Qwen3-8B 4096; ../shared/FLUX_FAMILY.md)
    Member(id="flux2-dev", label="FLUX.2 [dev]", requires=_frozen({"guidance_embed": True}), hidden_size=6144,
           double_blocks=8, single_blocks=48, context_dim=15360, guidance=True, base_model="flux2-dev",
           tiny=_frozen({**_TINY_FLUX2, "guidance_embed": True}), **_FLUX2_COMMON,
           # guidance-distilled like FLUX.1 [dev]: trained at 1.0 as dev is; so do musubi-tuner
           # (src/musubi_tuner/flux_2_train_network.py: "use 1.0 as guidance scale for FLUX.2 non-base
           # training") and ai-toolkit (guidance embedding = train cfg_scale, default 1.0); diffusers'
           # train_dreambooth_lora_flux2.py defaults to 3.5 (its help text is FLUX.1's)
           train_guidance=1.0, train_preset="flux2-dev", text_encoder="flux2"),
    Member(id="flux2-klein-4b", label="FLUX.2 [klein] 4B", requires=_frozen({"guidance_embed": False}),
           hidden_size=3072, double_blocks=5, single_blocks=20, context_dim=7680, guidance=False,
           base_model="flux2-klein-4b",
           variants=_KLEIN_VARIANTS, min_comfyui=(0, 33, 0),
           tiny=_frozen({**_TINY_FLUX2, "guidance_embed": False}), **_FLUX2_COMMON, **_KLEIN_TRAINING),
    Member(id="flux2-klein-9b", label="FLUX.2 [klein] 9B", requires=_frozen({"guidance_embed": False}),
           hidden_size=4096, double_blocks=8, single_blocks=24, context_dim=12288, guidance=False,
           base_model="flux2-klein-9b",
           variants=_KLEIN_VARIANTS, min_comfyui=(0, 33, 0), **_FLUX2_COMMON, **_KLEIN_TRAINING),
    Member(id="chroma", label="Chroma", generation=CHROMA, comfy_class="Chroma", requires=_frozen({}),
           hidden_size=3072, double_blocks=19, single_blocks=38, latent_channels=16, latent_downscale=8,
           context_dim=4096, guidance=False, pooled_vector=False, base_model="chroma",
           tiny=_frozen(_TINY_CHROMA), comfy_model="comfy.ldm.chroma.model.Chroma",
           # no distilled guidance, but its forward takes a guidance tensor: 0, as core's Chroma.extra_conds
           train_guidance=0.0, train_shift="chroma", train_preset="chroma", text_encoder="chroma"),
)

# --- sampler presets ------------------------------------------------------------------------------
# ``Member.presets``: preset name -> FluxQSamplerSettings values. Keys: steps, guidance (None: the
# model has no guidance input, the conditioning is left alone), cfg (real CFG with the negative
# when > 1), sampler_name, scheduler, shift_mode ("auto": ModelSamplingFlux's size-dependent mu;
# "flux2": Flux2Scheduler's sigmas, mu from size and steps; "model": the model's own sampling as
# ComfyUI built it; "fixed": `shift`), shift, and `needs` (what the graph must supply: "negative",
# "reference" (a reference latent), "inpaint" (InpaintModelConditioning's image + mask)).
# Names are public API (saved workflows hold them): add, never rename.
_FLUX1_DEV_PRESETS = {
    # diffusers' FluxPipeline: 28 steps, guidance 3.5; BFL / ComfyUI's template: euler, simple, size-dependent shift.
    "flux-dev": dict(steps=28, guidance=3.5, cfg=1.0, sampler_name="euler", scheduler="simple", shift_mode="auto"),
}
_PRESETS: dict[str, dict[str, dict]] = {
    "flux1-dev": _FLUX1_DEV_PRESETS,
    # BFL's cli_kontext.py (flux repo): num_steps 30, guidance 2.5; the edited image as reference tokens
    # (ComfyUI: ReferenceLatent, FLUX.1's "offset" method).
    "flux1-kontext-dev": {**_FLUX1_DEV_PRESETS, "flux-kontext": dict(
        steps=30, guidance=2.5, cfg=1.0, sampler_name="euler", scheduler="simple", shift_mode="auto",
        needs=("reference",))},
    # BFL's FLUX.1-Krea-dev demo (Hugging Face space app.py): 28 steps, guidance 4.5.
    "flux1-krea-dev": {**_FLUX1_DEV_PRESETS, "flux-krea": dict(
        steps=28, guidance=4.5, cfg=1.0, sampler_name="euler", scheduler="simple", shift_mode="auto")},
    # BFL's CLI: 4 steps, unshifted schedule (get_schedule(shift=False)); schnell has no guidance input.
    "flux1-schnell": {"flux-schnell": dict(steps=4, guidance=None, cfg=1.0, sampler_name="euler", scheduler="simple",
                                           shift_mode="fixed", shift=1.0)},
    # ComfyUI 0.33.0 blueprint "Image Inpainting (Flux.1 Fill Dev)": FluxGuidance 30, KSampler 20 steps euler /
    # normal, cfg 1 on the model's own sampling (no ModelSamplingFlux), InpaintModelConditioning (image + mask).
    "flux1-fill-dev": {"flux-fill": dict(steps=20, guidance=30.0, cfg=1.0, sampler_name="euler", scheduler="normal",
                                         shift_mode="model", needs=("inpaint",))},
    # ComfyUI 0.33.0 blueprint "Text to Image (Flux.2 Dev)": FluxGuidance 4, Flux2Scheduler 20 steps, euler,
    # BasicGuider (= cfg 1).
    "flux2-dev": {"flux2-dev": dict(steps=20, guidance=4.0, cfg=1.0, sampler_name="euler", scheduler="simple",
                                    shift_mode="flux2")},
    # klein: distilled 4 steps at cfg 1 (BFL's klein model cards); base from ComfyUI 0.33.0's blueprint
    # "Image Edit (Flux.2 Klein 4B)" (base checkpoint): Flux2Scheduler 20 steps, CFGGuider cfg 5, euler.
    "flux2-klein-4b": (_KLEIN := {
        "flux2-klein-distilled": dict(steps=4, guidance=None, cfg=1.0, sampler_name="euler", scheduler="simple",
                                      shift_mode="flux2"),
        "flux2-klein-base": dict(steps=20, guidance=None, cfg=5.0, sampler_name="euler", scheduler="simple",
                                 shift_mode="flux2", needs=("negative",)),
    }),
    "flux2-klein-9b": _KLEIN,
    # diffusers' ChromaPipeline defaults: 35 steps, guidance_scale 5 (real CFG, negative prompt); the model's
    # own sampling (ComfyUI's Chroma: ModelSamplingFlux at its fixed mu 1.15); no guidance input.
    "chroma": {"chroma": dict(steps=35, guidance=None, cfg=5.0, sampler_name="euler", scheduler="simple",
                              shift_mode="model", needs=("negative",))},
}
MEMBERS = tuple(replace(m, presets=_frozen({name: _frozen(values) for name, values in _PRESETS.get(m.id, {}).items()}))
                for m in MEMBERS)
# Every preset name once, in the order a user meets them (FLUX.1 dev first: the node's default).
PRESET_NAMES: tuple[str, ...] = tuple(dict.fromkeys(name for m in MEMBERS for name in m.presets))


def preset(name: str) -> Mapping[str, object]:
    """The settings of preset ``name`` (the same under every member that has it)."""
    for m in MEMBERS:
        if name in m.presets:
            return m.presets[name]
    raise KeyError(f"no sampler preset {name!r}; presets: {', '.join(PRESET_NAMES)}")


def preset_misfit(name: str, detection: Detection) -> str | None:
    """A warning when preset ``name`` is for another member than the detected model, else None."""
    if any(name in m.presets for m in detection.candidates):
        return None
    owners = [m.label for m in MEMBERS if name in m.presets]
    fitting = list(dict.fromkeys(p for m in detection.candidates for p in m.presets))
    return (f"warning: preset {name} is for {', '.join(owners)}, but the model is {detection.label}; "
            f"use {' or '.join(fitting) or 'custom'} (or custom).")


def training_messages(detection: Detection, sample_preset: str | None) -> list[str]:
    """What FluxQTrainLoRA tells the user before training the detected model: the member's note,
    and a warning when the samples' preset names a checkpoint LoRAs should not be trained on."""
    member = detection.member
    messages = [f"{member.label}: {member.train_note}"] if member.train_note else []
    if sample_preset in member.train_wrong_presets:
        messages.append(f"warning: the sample preset {sample_preset} says this {member.label} file is the distilled "
                        f"checkpoint; {member.train_note}. If the file is the base checkpoint, pick "
                        f"{member.train_preset} for the samples.")
    return messages


# What a "custom" shift_mode "auto" means per generation: FLUX.1's ModelSamplingFlux line through
# (256 tokens, 0.5) and (4096, 1.15) ("auto"; schnell stays unshifted), FLUX.2's Flux2Scheduler
# (mu from size and steps), Chroma's own fixed mu (ComfyUI's Chroma model sampling).
_AUTO_SHIFT = MappingProxyType({FLUX1: "auto", FLUX2: "flux2", CHROMA: "model"})


def auto_shift_mode(detection: Detection) -> str:
    return _AUTO_SHIFT[detection.member.generation]

BY_ID: Mapping[str, Member] = MappingProxyType({m.id: m for m in MEMBERS})
# The explicit allow-list: ComfyUI model classes the loader accepts (ChromaRadiance, pixel-space, is not one).
ALLOWED_COMFY_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(m.comfy_class for m in MEMBERS))


@user_facing
class FamilyError(ValueError):
    """A model or LoRA that is not (or not this) FLUX family member."""


@dataclass(frozen=True)
class Detection:
    member: Member  # the first of ``candidates``: what presets and metadata default to
    candidates: tuple[Member, ...]  # members the file's tensors fit (identical tensors)
    hidden_size: int
    double_blocks: int
    single_blocks: int

    @property
    def released_size(self) -> bool:
        return (self.hidden_size, self.double_blocks, self.single_blocks) == (
            self.member.hidden_size, self.member.double_blocks, self.member.single_blocks)

    @property
    def label(self) -> str:
        """E.g. 'FLUX.2 [klein] 9B', or for a test/pruned file the member and its actual size."""
        if self.released_size:
            return self.member.label
        # a width no released size has: the size in the name ("klein 4B") would be a guess
        generic = self.member.label if self.member.hidden_size == self.hidden_size \
            else re.sub(r" \d+B$", "", self.member.label)
        return (f"{generic} (not a released size: hidden {self.hidden_size}, "
                f"{self.double_blocks} double + {self.single_blocks} single blocks)")

    def describe(self) -> str:
        """What the loader shows on the node and logs: the family and what the user must choose."""
        text = f"detected {self.label}"
        others = [m.label for m in self.candidates if m is not self.member]
        if others:
            text += (f"; {self.member.label}, {', '.join(others)} have identical tensors and cannot be told "
                     "apart: pick the preset for the one this file is")
        if self.member.variants:
            text += (f"; its {' and '.join(self.member.variants)} checkpoints have identical tensors: "
                     "pick the matching preset")
        return text


def _size_of(unet_config: Mapping[str, object]) -> tuple[int, int, int]:
    return (int(unet_config.get("hidden_size", 0)), int(unet_config.get("depth", 0)),
            int(unet_config.get("depth_single_blocks", 0)))


def identify(comfy_class: str, unet_config: Mapping[str, object], source: str = "the model") -> Detection:
    """The member ComfyUI's detection found: ``comfy_class`` is the name of the ``supported_models``
    class, ``unet_config`` its detected config (hidden_size, depth, depth_single_blocks,
    guidance_embed, in_channels). Raises FamilyError naming what was found for anything else."""
    hidden, double, single = _size_of(unet_config)
    if comfy_class not in ALLOWED_COMFY_CLASSES:
        raise FamilyError(f"{source}: ComfyUI detects it as {comfy_class}, not a FLUX family model "
                          f"(accepted: {', '.join(ALLOWED_COMFY_CLASSES)}).")
    fitting = tuple(m for m in MEMBERS if m.comfy_class == comfy_class
                    and all(unet_config.get(k) == v for k, v in m.requires.items()))
    if not fitting:
        found = ", ".join(f"{k}={unet_config.get(k)}" for k in sorted({k for m in MEMBERS for k in m.requires}))
        raise FamilyError(f"{source}: ComfyUI detects it as {comfy_class} ({found}), which is no FLUX family "
                          f"member this pack supports ({', '.join(m.label for m in MEMBERS)}).")
    # Width tells released sizes apart (klein 4B / 9B); members of one width share their tensors.
    by_width = tuple(m for m in fitting if m.hidden_size == hidden) or fitting
    candidates = tuple(m for m in by_width if m.id in by_width[0].same_tensors_as) or by_width[:1]
    return Detection(candidates[0], candidates, hidden, double, single)


def refusal_for_comfyui(detection: Detection, comfyui_version: tuple[int, int, int]) -> str | None:
    """Why this ComfyUI cannot run the detected model (naming the version needed), else None."""
    member = detection.member
    other_width = detection.hidden_size != member.hidden_size
    needed = max(member.min_comfyui, ANY_WIDTH_COMFYUI) if other_width else member.min_comfyui
    if comfyui_version >= needed:
        return None
    have, need = ".".join(map(str, comfyui_version)), ".".join(map(str, needed))
    why = "" if needed == member.min_comfyui else " at this width (older detection fixes the released widths)"
    return f"{detection.label} needs ComfyUI {need} or newer{why}; this is ComfyUI {have}."


def parse_version(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


# --- LoRAs: which generation a key set belongs to ---------------------------------------------
# Module names only one generation has (BFL, kohya and diffusers spellings).
_GENERATION_MARKERS: dict[str, re.Pattern] = {
    FLUX1: re.compile(r"(^|[._])(img_mod|txt_mod|vector_in|norm1[._]linear|norm1_context[._]linear)[._]"
                      r"|(^|[._])single_blocks[._]\d+[._]modulation[._]|[._]ff(_context)?[._]net[._]"),
    FLUX2: re.compile(r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj|[._]linear_in[._]"),
    CHROMA: re.compile(r"distilled_guidance_layer"),
}
# Chroma is FLUX.1 [schnell] with its modulation moved into the approximator: FLUX.1 LoRAs are
# used on it (their modulation keys find no layer there, as core reports them).
ACCEPTS_LORAS_OF: Mapping[str, frozenset[str]] = MappingProxyType({
    FLUX1: frozenset({FLUX1}), FLUX2: frozenset({FLUX2}), CHROMA: frozenset({CHROMA, FLUX1})})
_BLOCK_INDEX = {
    "double": re.compile(r"(?:^|[._])(?:double_blocks|transformer_blocks)[._](\d+)[._]"),
    "single": re.compile(r"(?:^|[._])(?:single_blocks|single_transformer_blocks)[._](\d+)[._]"),
}


# Block layers whose shape tells the generation at any width h, read from a plain LoRA's factors
# (A/down: (rank, in), B/up: (out, rank)). FLUX.1 (and Chroma): GELU MLP of 4h, single blocks'
# linear1 = qkv + MLP in (7h out), linear2 = attention + MLP out (5h in). FLUX.2: SwiGLU MLP of 3h
# with gate and value fused (6h out, 3h in), linear1 9h out, linear2 4h in. Attention layers (h to
# 3h, h to h) are the same in both: a LoRA on the double blocks' attention alone, within the
# blocks both have, carries nothing that tells them apart, and is applied as its names say.
_SHAPE_RATIOS: tuple[tuple[re.Pattern, str, Mapping[int, str]], ...] = (
    (re.compile(r"(?:^|[._])double_blocks[._]\d+[._](?:img|txt)_mlp[._]0$"), "out/in", {4: FLUX1, 6: FLUX2}),
    (re.compile(r"(?:^|[._])double_blocks[._]\d+[._](?:img|txt)_mlp[._]2$"), "in/out", {4: FLUX1, 3: FLUX2}),
    (re.compile(r"(?:^|[._])single_blocks[._]\d+[._]linear1$"), "out/in", {7: FLUX1, 9: FLUX2}),
    (re.compile(r"(?:^|[._])single_blocks[._]\d+[._]linear2$"), "in/out", {5: FLUX1, 4: FLUX2}),
)
_LORA_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<side>lora_A|lora_down|lora_B|lora_up)\.weight$")


def _generations_by_shape(shapes: Mapping[str, tuple[int, ...]]) -> set[str]:
    """Generations the shapes of plain-LoRA factors on the MLP / linear1 / linear2 layers name."""
    sizes: dict[str, dict[str, int]] = {}
    for key, shape in shapes.items():
        factor = _LORA_FACTOR.match(key)
        if factor and len(shape) == 2:
            down = factor["side"] in ("lora_A", "lora_down")
            sizes.setdefault(factor["module"], {})["in" if down else "out"] = shape[1] if down else shape[0]
    found = set()
    for module, size in sizes.items():
        for pattern, ratio, generation_of in _SHAPE_RATIOS:
            if pattern.search(module) and len(size) == 2:
                numerator, denominator = (size["out"], size["in"]) if ratio == "out/in" else (size["in"], size["out"])
                if denominator and numerator % denominator == 0 and numerator // denominator in generation_of:
                    found.add(generation_of[numerator // denominator])
    return found


def lora_evidence(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]] | None = None
                  ) -> tuple[set[str], int, int]:
    """(generations named by generation-only module names or by layer shapes (``shapes``: key ->
    tensor shape), double blocks, single blocks touched)."""
    generations: set[str] = _generations_by_shape(shapes or {})
    blocks = {"double": 0, "single": 0}
    for key in keys:
        for generation, pattern in _GENERATION_MARKERS.items():
            if pattern.search(key):
                generations.add(generation)
        for kind, pattern in _BLOCK_INDEX.items():
            match = pattern.search(key)
            # diffusers' "single_transformer_blocks" also contains "transformer_blocks"
            if match and not (kind == "double" and "single_transformer_blocks" in key):
                blocks[kind] = max(blocks[kind], int(match.group(1)) + 1)
    return generations, blocks["double"], blocks["single"]


def lora_family_mismatch(keys: Iterable[str], model: Detection, lora_name: str = "the LoRA",
                         shapes: Mapping[str, tuple[int, ...]] | None = None) -> str | None:
    """Why a LoRA's keys belong to another family member than ``model``, else None.

    Decided by key set, layer shapes (``shapes``: key -> tensor shape) and block count, not by a
    shape fitting: a FLUX.1 LoRA's double-block shapes fit FLUX.2 [klein] 4B (both 3072 wide), but
    its MLP and single-block layers have FLUX.1's proportions. A LoRA reaching past the model's
    blocks is refused, except on a model of no released size (pruned, tiny) when a released member
    of its own generation has those blocks: a FLUX.1 [dev] LoRA on a pruned FLUX.1 applies where
    the blocks exist."""
    generations, double, single = lora_evidence(keys, shapes)
    family = model.member.generation
    accepted = ACCEPTS_LORAS_OF[family]
    foreign = generations - accepted
    if foreign and not generations & accepted:
        named = "/".join(sorted(foreign))
        return (f"{lora_name} is a {' / '.join(sorted(foreign))} LoRA (its keys name {named}-only layers, "
                f"or its layers have {named}'s shapes); the model is {model.label} ({family}).")
    if double <= model.double_blocks and single <= model.single_blocks:
        return None
    owners = [m for m in MEMBERS if m.double_blocks >= double and m.single_blocks >= single
              and (m.generation in generations if generations else True)]
    if not model.released_size and any(m.generation in accepted for m in owners):
        return None
    belongs = f" (fits {', '.join(m.label for m in owners)})" if owners else ""
    return (f"{lora_name} targets {double} double and {single} single blocks{belongs}; the model is "
            f"{model.label} with {model.double_blocks} + {model.single_blocks}: a LoRA for another "
            "FLUX family member.")


# --- text encoders from llama.cpp GGUF files (FluxQLoadTextEncodersGGUF `type`) ---------------


@dataclass(frozen=True)
class EncoderSpec:
    """What one FLUX.2 encoder needs from a llama.cpp GGUF file (read by ``llm_gguf``)."""

    label: str  # for messages
    arches: tuple[str, ...]  # accepted ``general.architecture`` values
    taps: tuple[int, ...]  # hidden states ComfyUI's encoder class concatenates (layer inputs)
    full_layers: int  # layer count of the real model
    qk_norm: bool  # Qwen3 normalises q and k per head


# The taps are ComfyUI's (``Mistral3_24BModel`` layer=[10, 20, 30], ``Qwen3_4BModel`` [9, 18, 27]):
# a file needs at least max(taps) layers, tap i being the input of layer i (i == layers: the output).
TEXT_ENCODERS = {
    "flux2": EncoderSpec("Mistral-Small 3.x (FLUX.2 [dev])", ("llama", "mistral3"), (10, 20, 30), 40, False),
    "klein": EncoderSpec("Qwen3 4B/8B (FLUX.2 [klein])", ("qwen3",), (9, 18, 27), 36, True),
}
