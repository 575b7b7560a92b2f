"""Runtime LoRAs: the ``APPLY_MODEL`` wrapper holding a ``LoraStack``, CLIP parts, adapter building."""

from __future__ import annotations

import logging
import uuid

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

from ...lora_ops import flux_family
from ...lora_ops.block_weights import BlockSpec, BlockWeights, parse_block_weights
from ...lora_ops.errors import user_facing
from ...lora_ops.lora_formats import (
    LoraFormatError,
    describe_format,
    detect_format,
    header_scale,
    normalize_flux_lora,
    read_lora_file_with_metadata,
)
from ...lora_ops.lora_runtime import (
    REMOVE_ALL,
    DoRAAdapter,
    KroneckerAdapter,
    LoraEntry,
    LoraStack,
    LowRankAdapter,
    activate,
    hadamard_as_low_rank,
    install_hooks,
)
from .common import model_family
from .quantized import compute_dtype, lora_target, sync_resident_layers

log = logging.getLogger("fluxq")


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
        target = lora_target(base_model)
        install_hooks(target, self.stack.module_paths(), layer_base_weight)
        sync_resident_layers(base_model, self.stack, args[0])
        # Each layer's LoRAs resolved here, cast once to the compute dtype on the input's device,
        # outside the compiled graph (TorchCompileModel compiles the diffusion model inside).
        with activate(self.stack, args[0].device, compute_dtype(base_model), root=target):
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


@user_facing
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


def refuse_other_family(model, keys, lora_name: str, shapes=None) -> None:
    """LoraMatchError when the LoRA's key set, layer shapes (``shapes``: key -> shape) and block
    count say it is for another FLUX family member than the model (e.g. a FLUX.1 LoRA on FLUX.2
    [klein] 4B, whose attention shapes would fit)."""
    try:
        detection = model_family(model)
    except flux_family.FamilyError as error:
        raise LoraMatchError(f"{lora_name}: {error}") from None
    mismatch = flux_family.lora_family_mismatch(keys, detection, lora_name, shapes)
    if mismatch is not None:
        raise LoraMatchError(mismatch)


def model_block_weights(model, spec: BlockSpec | str) -> BlockWeights | None:
    """Block-weight text (or a parsed spec) fitted to this MODEL's block counts, from what ComfyUI
    detected (FLUX.1 19 + 38, FLUX.2 [dev] 8 + 48, a test model's own); None when every weight is 1."""
    spec = parse_block_weights(spec) if isinstance(spec, str) else spec
    if spec.is_all:
        return None
    detection = model_family(model)
    weights = spec.resolve(detection.double_blocks, detection.single_blocks, detection.label)
    return None if weights.is_identity else weights


def load_lora_entry(model, lora_name: str, strength: float, clip=None, strength_clip: float = 0.0,
                    block_weights: BlockWeights | None = None):
    """Parse a LoRA file with ComfyUI's own key mapping into a runtime ``LoraEntry``.

    Returns ``(entry, clip_or_None, report)``. CLIP (``lora_te1_``) keys go through core patches;
    ``block_weights`` (``model_block_weights``) scale the MODEL part per block, never the CLIP part.
    """
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    lora_sd, metadata = read_lora_file_with_metadata(path)  # refuses pickles; checks header, NaN/Inf, dtypes
    fmt = detect_format(lora_sd.keys())
    raw_keys = set(lora_sd)
    lora_sd = normalize_flux_lora(lora_sd)
    # the file's own names too: normalising FLUX.2's diffusers names (ff.linear_in) to BFL ones
    # (img_mlp.0, as FLUX.1's) must not hide which generation the file is for
    refuse_other_family(model, raw_keys | set(lora_sd), lora_name, {k: tuple(t.shape) for k, t in lora_sd.items()})
    adapters, matched, sources = runtime_adapters(model, lora_sd, lora_name, header_scale(metadata, lora_name))

    clip_out, clip_strength = None, None
    if clip is not None:
        clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        clip_patches = comfy.lora.load_lora(lora_sd, clip_map, log_missing=False)
        matched |= _matched_keys(clip_patches, lora_sd)
        clip_out = with_clip_lora(clip, lora_name, clip_patches, strength_clip)
        clip_strength = float(strength_clip) if clip_patches else None

    if not adapters:
        raise LoraMatchError(
            f"{lora_name}: matched no layer of this FLUX model ({len(lora_sd)} keys, format '{fmt}'). "
            f"It {describe_format(lora_sd.keys())}."
        )
    unmatched = sorted(k for k in lora_sd if k not in matched)
    entry = LoraEntry(name=lora_name, strength=float(strength), adapters={path: tuple(a) for path, a in adapters.items()},
                      clip_strength=clip_strength, block_weights=block_weights)
    scale_note = "; ".join(
        _SCALE_SOURCES[s] + ("" if len(sources) == 1 else f" ({n} modules)") for s, n in sorted(sources.items()))
    report = f"{lora_name} ({fmt}): {len(adapters)} modules matched, {len(unmatched)} keys unmatched"
    if unmatched:
        report += ": " + ", ".join(unmatched[:8]) + (" ..." if len(unmatched) > 8 else "")
    report += f"; {scale_note}"
    if block_weights is not None:
        report += f"; block weights {block_weights.describe()} (other blocks 1)"
    if unmatched:
        log.warning("[FluxQ] %s", report)
    else:
        log.info("[FluxQ] %s", report)
    return entry, clip_out, report
