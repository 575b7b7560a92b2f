"""Recognising FLUX family LoRA files in the wild and rewriting the few layouts ComfyUI cannot read.

ComfyUI's `comfy.lora.model_lora_keys_unet` already maps kohya / musubi-tuner `lora_unet_*`,
diffusers `transformer.*` (q/k/v and proj_mlp as slices of the fused layers; 0.33 also FLUX.2's
`ff.linear_in`, `attn.to_qkv_mlp_proj`, `attn.to_out`), OneTrainer `lora_transformer_*`,
SimpleTuner `lycoris_*` and `diffusion_model.*` BFL names (ai-toolkit), with LoRA, LoHa and LoKr
weights, for FLUX.1, FLUX.2 and Chroma alike. `normalize_flux_lora` only rewrites what falls
outside that map: XLabs processors, bare and PEFT `base_model.model.` names (hosted trainers), and
the FLUX.2 diffusers names some core lacks.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import safetensors
import safetensors.torch
import torch

from .errors import user_facing


@user_facing
class LoraFormatError(ValueError):
    """A LoRA file that cannot or must not be loaded."""


# --- format detection -------------------------------------------------------------------------

# Module paths of FLUX.1 itself: BFL names, or diffusers names at the top of the path (SD UNets
# also have `transformer_blocks`, but nested inside `attentions`).
_FLUX_KEY = re.compile(
    r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d"
    r"|^(transformer\.|base_model\.model\.|lora_transformer_|lycoris_)?transformer_blocks[._]\d"
)
# Within FLUX, the first rule any key matches decides; LoHa/LoKr weights first, whatever names.
_FLUX_FORMATS = (
    ("lycoris", re.compile(r"\.(lokr|hada)_[wt]\d")),
    ("xlabs", re.compile(r"^(double|single)_blocks\.\d+\.processor\.")),
    ("kohya", re.compile(r"^lora_unet_")),
    ("diffusers", re.compile(r"transformer_blocks[._]\d")),
    ("bfl", re.compile(r"(double|single)_blocks\.\d")),
)
# kohya names built from diffusers FLUX module names (diffusers' SD-era convert_state_dict_to_kohya
# writes them): no FLUX loader reads this layout, kohya FLUX names BFL modules.
_KOHYA_FROM_DIFFUSERS = re.compile(r"^(lora_unet_)?(transformer_)?(single_transformer_blocks|transformer_blocks)_\d+_")
# SD families, for a clear refusal. kohya names SDXL modules the SGM way (input_blocks) and
# SD1.5 ones the diffusers way; only SDXL has two CLIPs and transformer depth above 1.
_SD_FORMATS = (
    (
        "sdxl",
        re.compile(r"^lora_te[12]_|^text_encoder_2\.|^lora_unet_(input|output)_blocks_|transformer_blocks[._][1-9]"),
    ),
    ("sd15", re.compile(r"^lora_te_|^lora_unet_(down|up)_blocks_|^lora_unet_mid_block_|^(unet|text_encoder)\.")),
)

_DESCRIPTIONS = {
    "kohya": "a kohya-ss / musubi-tuner FLUX LoRA",
    "diffusers": "a diffusers/PEFT FLUX LoRA",
    "xlabs": "an XLabs FLUX.1 LoRA",
    "bfl": "a FLUX LoRA with BFL module names",
    "lycoris": "a LyCORIS (LoKr/LoHa) FLUX LoRA",
    "sdxl": "an SDXL LoRA, not a FLUX.1 one",
    "sd15": "a Stable Diffusion 1.x LoRA, not a FLUX.1 one",
}
# Layouts that are recognised but that no loader reads: what the file is, without "looks like".
_REFUSALS = {
    "kohya_diffusers_names": "has SD-style kohya names built from diffusers module names "
                             "(as diffusers' convert_state_dict_to_kohya writes them): not a FLUX "
                             "layout any loader reads; kohya FLUX LoRAs name BFL modules "
                             "(lora_unet_double_blocks_0_img_attn_qkv)",
}


def _detect(keys: Iterable[str]) -> tuple[str, list[str]]:
    """(format, the sorted keys that decided it)."""
    keys = sorted(keys)
    misnamed = [k for k in keys if _KOHYA_FROM_DIFFUSERS.search(k)]
    if misnamed:
        return "kohya_diffusers_names", misnamed
    flux_keys = [k for k in keys if _FLUX_KEY.search(k)]
    rules = _FLUX_FORMATS if flux_keys else _SD_FORMATS
    for name, pattern in rules:
        evidence = [k for k in (flux_keys or keys) if pattern.search(k)]
        if evidence:
            return name, evidence
    return "unknown", keys


def detect_format(keys: Iterable[str]) -> str:
    """One of kohya, diffusers, xlabs, bfl, lycoris, sdxl, sd15, kohya_diffusers_names, unknown."""
    return _detect(keys)[0]


def describe_format(keys: Iterable[str]) -> str:
    """A sentence for error messages, e.g. 'looks like an SDXL LoRA, ... (keys such as ...)'."""
    name, evidence = _detect(keys)
    if not evidence:
        return "holds no tensors"
    examples = ", ".join(evidence[:2]) + (", ..." if len(evidence) > 2 else "")
    if name == "unknown":
        return f"is not a LoRA layout this pack recognises (keys such as {examples})"
    if name in _REFUSALS:
        return f"{_REFUSALS[name]} (keys such as {examples})"
    return f"looks like {_DESCRIPTIONS[name]} (keys such as {examples})"


# --- normalisation ----------------------------------------------------------------------------

# XLabs processor LoRAs: lora1 = image stream, lora2 = text stream; single blocks have one qkv
# (the first 3*hidden rows of linear1, core's `linear1_qkv` slice) and a proj on linear2's input.
_XLABS_MODULES = {
    "qkv_lora1": "img_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora2": "txt_attn.proj",
    "qkv_lora": "linear1_qkv",
    "proj_lora": "linear2",
}
_XLABS_KEY = re.compile(r"^((?:double|single)_blocks\.\d+)\.processor\.(\w+)\.(down|up)\.weight$")

_PEFT_PREFIX = "base_model.model."
# Top-level FLUX module names (FLUX.1, FLUX.2's global modulation, Chroma's approximator), and the
# prefix core's key map expects in front of them.
_BFL_TOP = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer",
            "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation",
            "distilled_guidance_layer")
_DIFFUSERS_TOP = (
    "transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
    "time_text_embed", "norm_out", "proj_out",
)  # fmt: skip
_PREFIX_FOR_TOP = {**dict.fromkeys(_BFL_TOP, "diffusion_model."), **dict.fromkeys(_DIFFUSERS_TOP, "transformer.")}


# FLUX.2's diffusers module names, as the BFL modules diffusers' own
# `convert_flux2_transformer_checkpoint_to_diffusers` maps them from (one to one, no row reordering):
# the global modulation and the time/guidance embedders, which no ComfyUI's key map has
# (`flux_to_diffusers` was written for FLUX.1), and the unsplit block layers, which ComfyUI 0.3.75's
# lacks. q/k/v (row slices of the fused qkv) and the attention outputs keep FLUX.1's names, which
# every core maps. Without a prefix or under `transformer.` / `base_model.model.`.
_FLUX2_DIFFUSERS_TO_BFL = {
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "transformer_blocks.{}.ff.linear_in": "double_blocks.{}.img_mlp.0",
    "transformer_blocks.{}.ff.linear_out": "double_blocks.{}.img_mlp.2",
    "transformer_blocks.{}.ff_context.linear_in": "double_blocks.{}.txt_mlp.0",
    "transformer_blocks.{}.ff_context.linear_out": "double_blocks.{}.txt_mlp.2",
    "single_transformer_blocks.{}.attn.to_qkv_mlp_proj": "single_blocks.{}.linear1",
    "single_transformer_blocks.{}.attn.to_out": "single_blocks.{}.linear2",
}
_FLUX2_DIFFUSERS_KEY = re.compile(r"^(?:transformer\.)?(?P<module>{})(?P<rest>\..+)$".format(
    "|".join(re.escape(k).replace(r"\{\}", r"\d+") for k in _FLUX2_DIFFUSERS_TO_BFL)))


def _flux2_bfl_name(module: str) -> str:
    """The BFL module of a FLUX.2 diffusers module `_FLUX2_DIFFUSERS_KEY` matched."""
    block = re.search(r"\.(\d+)\.", module)
    pattern = module if block is None else module.replace(block.group(0), ".{}.", 1)
    return _FLUX2_DIFFUSERS_TO_BFL[pattern].format(*(() if block is None else (block.group(1),)))


def _is_bfl_control_lora(sd: dict) -> bool:
    # Core converts these itself (convert_lora_bfl_control), keyed on their bare names.
    return "img_in.lora_A.weight" in sd and "single_blocks.0.norm.key_norm.scale" in sd


def _normalized_key(key: str) -> str:
    xlabs = _XLABS_KEY.match(key)
    if xlabs and xlabs.group(2) in _XLABS_MODULES:
        block, module, side = xlabs.groups()
        # No .alpha is written: XLabs files carry none, and core then scales by 1.
        return f"diffusion_model.{block}.{_XLABS_MODULES[module]}.lora_{side}.weight"
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    flux2 = _FLUX2_DIFFUSERS_KEY.match(key)
    if flux2:
        return f"diffusion_model.{_flux2_bfl_name(flux2['module'])}{flux2['rest']}"
    prefix = _PREFIX_FOR_TOP.get(key.split(".", 1)[0])
    return prefix + key if prefix else key


def normalize_flux_lora(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrites XLabs, bare BFL/diffusers, PEFT `base_model.model.` and FLUX.2 diffusers keys core
    does not map into names it maps.

    Every other key passes through unchanged; tensors are not copied.
    """
    if _is_bfl_control_lora(sd):
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        new_key = _normalized_key(key)
        if new_key in out:
            raise LoraFormatError(f"two keys normalise to {new_key!r} (one of them is {key!r})")
        out[new_key] = tensor
    return out


# --- scale recorded in the header (diffusers / PEFT) ---------------------------------------------

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # what diffusers writes (lora_base.py)


@dataclass(frozen=True)
class HeaderScale:
    """PEFT's LoraConfig scale rule, from the JSON diffusers stores in the safetensors header:
    per module, r and alpha from `rank_pattern` / `alpha_pattern` (PEFT's `get_pattern_key`
    match on the module name) else `r` / `lora_alpha`; scale alpha/r, or alpha/√r with use_rslora."""

    r: int
    lora_alpha: float
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False

    def scale(self, module_name: str, rank: int, source: str) -> float:
        """`module_name` relative to the transformer (e.g. `transformer_blocks.0.attn.to_q`);
        `rank` the file's tensors' rank, which must be the recorded one."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module_name), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_name), self.lora_alpha)
        if r != rank:
            raise LoraFormatError(
                f"{source}: the header's {LORA_ADAPTER_METADATA_KEY} gives {module_name} rank {r}, "
                f"but its tensors have rank {rank}"
            )
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict, module_name: str) -> str:
    # peft.utils.other.get_pattern_key: the first pattern that matches the end of the name.
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return pattern
    return module_name


def header_scale(metadata: dict[str, str] | None, source: str) -> HeaderScale | None:
    """The scale rule of a safetensors header, or None when it records none.

    diffusers writes the LoraConfig as JSON under `lora_adapter_metadata`: bare when saved from
    the model (`save_lora_adapter`), keys prefixed `transformer.` when saved from the pipeline.
    """
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"{source}: the header's {LORA_ADAPTER_METADATA_KEY} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{source}: the header's {LORA_ADAPTER_METADATA_KEY} is not a JSON object")
    prefixed = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    config = prefixed or config
    if "lora_alpha" not in config or "r" not in config:
        return None
    try:
        rule = HeaderScale(
            r=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
            rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
            use_rslora=bool(config.get("use_rslora", False)),
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise LoraFormatError(f"{source}: the header's {LORA_ADAPTER_METADATA_KEY} has a bad r/lora_alpha/pattern: {e}") from None
    if rule.r <= 0 or not math.isfinite(rule.lora_alpha):
        raise LoraFormatError(f"{source}: the header's {LORA_ADAPTER_METADATA_KEY} has r={rule.r}, lora_alpha={rule.lora_alpha}")
    return rule


# --- kohya names ------------------------------------------------------------------------------

KOHYA_UNET_PREFIX = "lora_unet_"


def kohya_name(module_path: str) -> str:
    """`double_blocks.0.img_attn.qkv` -> `lora_unet_double_blocks_0_img_attn_qkv`."""
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def module_path_from_kohya_name(name: str, module_paths: Iterable[str]) -> str:
    """The inverse of `kohya_name`; needs the real paths, since `_` also occurs inside names."""
    matches = [p for p in module_paths if kohya_name(p) == name]
    if len(matches) != 1:
        found = "no module" if not matches else f"several modules ({', '.join(matches)})"
        raise KeyError(f"{name!r} names {found}")
    return matches[0]


# --- reading and validation -------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6
_PICKLE_PROTO = 0x80  # first byte of a pickle, protocol 2 and later (old torch.save, .ckpt)
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def _refuse(path: str, what: str) -> LoraFormatError:
    return LoraFormatError(
        f"{path}: {what}, not a safetensors file. Only .safetensors LoRAs are loaded: pickled "
        f"checkpoints (.ckpt, .pt, .bin) are refused because unpickling can run arbitrary code."
    )


def _check_safetensors_header(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(_ZIP_MAGIC) or head[:1] == bytes([_PICKLE_PROTO]):
            raise _refuse(path, "this is a PyTorch pickle")
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= header_len <= min(size - 8, _MAX_HEADER_BYTES):
            raise _refuse(path, "the file does not start with a safetensors header")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: deeply nested JSON
            raise _refuse(path, "the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _refuse(path, "the safetensors header is not a JSON object")


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads and validates a .safetensors LoRA; never unpickles anything."""
    return read_lora_file_with_metadata(path)[0]


def read_lora_file_with_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`read_lora_file` plus the header's string metadata (empty when it has none)."""
    path = os.fspath(path)
    _check_safetensors_header(path)
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            sd = {key: f.get_tensor(key) for key in f.keys()}
    except safetensors.SafetensorError as e:
        raise LoraFormatError(f"{path}: damaged safetensors file: {e}") from None
    validate_lora_tensors(sd, path)
    return sd, metadata


def validate_lora_tensors(sd: dict[str, torch.Tensor], source: str) -> None:
    """Raises LoraFormatError for an empty file, non-float tensors, or NaN/Inf values."""
    if not sd:
        raise LoraFormatError(f"{source}: the file holds no tensors")
    for key, tensor in sd.items():
        # kohya writes `alpha` as an int64 scalar when it defaulted to the rank.
        allowed_integer = key.endswith(".alpha") and not tensor.dtype.is_complex and tensor.dtype != torch.bool
        if not (tensor.is_floating_point() or allowed_integer):
            raise LoraFormatError(f"{source}: tensor {key!r} has dtype {tensor.dtype}, expected floating point")
        # isfinite has no float8 kernel, so those are checked as float32.
        values = tensor.float() if tensor.element_size() == 1 and tensor.is_floating_point() else tensor
        if not torch.isfinite(values).all():
            raise LoraFormatError(f"{source}: tensor {key!r} contains NaN or Inf values")
