"""The LoRA workbench's seam: LoRA files parsed into per-layer updates with ComfyUI's key map, and a
MODEL's diffusion weights read as it is applied (GGUF or float base, core patches, runtime LoRAs)."""

from __future__ import annotations

import os
import re

import comfy.model_management
import folder_paths
import torch

from ...lora_ops.qlinear import fold_
from .lora import get_lora_stack, load_lora_entry


def checked_file_name(name: str, extension: str, input_name: str) -> str:
    """`name` as a plain file name ending in `extension` (added when missing)."""
    name = name.strip()
    if not name.lower().endswith(extension):
        name += extension
    if name == extension or name.startswith(".") or re.search(r"[/\\:\x00]", name):
        raise ValueError(f"{input_name} {name!r} must be a plain file name (no folders, not starting with '.')")
    return name


def save_path(folder: str, name: str) -> str:
    """Where a new file goes: the first of ComfyUI's `folder` folders named like it (models/loras,
    models/diffusion_models rather than the legacy models/unet listed first), else the first."""
    paths = folder_paths.get_folder_paths(folder)
    named = [p for p in paths if os.path.basename(os.path.normpath(p)) == folder]
    return os.path.join((named or paths)[0], name)


def lora_layers(model, loras: list[tuple[str, float]]):
    """`({module path: [(weight, adapter), ...]}, {module path: (out, in)}, [load report, ...])`
    for LoRA files of the `loras` folder, parsed as FluxQApplyLoRA parses them (any format it reads)."""
    layers: dict[str, list] = {}
    reports = []
    for name, weight in loras:
        entry, _, report = load_lora_entry(model, name, 1.0)
        reports.append(report)
        for path, adapters in entry.adapters.items():
            layers.setdefault(path, []).extend((weight, adapter) for adapter in adapters)
    diffusion_model = model.model.diffusion_model
    shapes = {}
    for path in layers:
        module = diffusion_model.get_submodule(path)
        shapes[path] = (module.out_features, module.in_features)
    return layers, shapes, reports


class AppliedWeights:
    """A MODEL's diffusion-model weights as sampling applies them, one tensor at a time, in float32
    on the CPU: GGUF layers dequantized, core patches (LoraLoader) applied, the runtime LoRA stack
    (FluxQApplyLoRA, at its strengths) folded in. Names are the diffusion model's (BFL names).

    The model is first loaded in full, as core's checkpoint save does: float weights then carry their
    core patches, and each GGUF layer holds this patcher's (the layers are shared between clones)."""

    def __init__(self, model):
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        self.model = model
        self.diffusion_model = model.model.diffusion_model
        self.stack = get_lora_stack(model)
        self._params = dict(self.diffusion_model.state_dict(keep_vars=True))
        self._names = [n for n, t in self._params.items() if t.is_floating_point() or self._module(n) is not None]

    def _module(self, name: str):
        """The quantized module owning `name` when `name` is its GGUF weight, else None."""
        path, _, param = name.rpartition(".")
        module = self.diffusion_model.get_submodule(path) if path else self.diffusion_model
        return module if param == "weight" and getattr(module, "qtype", None) is not None else None

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        module = self._module(name)
        return tuple(module.qshape) if module is not None else tuple(self._params[name].shape)

    def tensor(self, name: str) -> torch.Tensor:
        """Computed where the weight lives (a GPU dequantizes and folds fast), returned on the CPU."""
        module = self._module(name)
        if module is not None:  # dequantized with the module's core patches (FluxQModelPatcher)
            weight = module._dequantized_weight(torch.float32, module.weight.device)
        else:  # patched in place by the full load
            weight = self._params[name].detach().to(torch.float32, copy=True)
        path, _, param = name.rpartition(".")
        if param == "weight" and path in self.stack.module_paths():
            weight = fold_(weight, self.stack.adapters_for(path))  # a copy: ours to change
        return weight.cpu()
