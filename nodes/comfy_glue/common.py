"""Small shared pieces of the ComfyUI seam: file choices, progress text, guidance."""

from __future__ import annotations

import os
import sys

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ...lora_ops import flux_family

DEQUANT_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
RESIDENT_MODES = ("off", "auto", "on")


def check_file_choice(folder: str, input_name: str, value: str, extra_choices: tuple[str, ...] = ()) -> bool | str:
    """``validate_inputs`` for a file dropdown: ComfyUI 0.3.75 does not check V3 combo values, so
    an API prompt could name any file. Returns True or the message ComfyUI shows (HTTP 400)."""
    if value in extra_choices or value in folder_paths.get_filename_list(folder):
        return True
    # the folders as the user knows them (diffusion_models, unet), not the pack's registry key
    names = dict.fromkeys(os.path.basename(os.path.normpath(p)) for p in folder_paths.get_folder_paths(folder))
    return f"{input_name}: '{value}' is not a file in ComfyUI's model folders ({', '.join(names)})."


def show_progress_text(text: str, node_id) -> None:
    """Text on the node in the UI. Looked up, not imported: called as a library (tests, scripts)
    there is no running server to tell."""
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)


def progress_bar(total: int, node_id=None):
    """ComfyUI's progress bar (shown on the node in a server; a no-op as a library)."""
    return comfy.utils.ProgressBar(total, node_id=node_id)


def raise_if_cancelled() -> None:
    """Raises ComfyUI's interrupt when the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


# What core's FLUX model uses when the conditioning carries no guidance (comfy.model_base.Flux.extra_conds).
CORE_DEFAULT_GUIDANCE = 3.5


def has_guidance_input(model) -> bool:
    """Whether a FLUX MODEL takes distilled guidance (dev has a guidance_in layer; schnell has none)."""
    return bool(model.model.model_config.unet_config.get("guidance_embed", False))


def comfyui_version() -> tuple[int, int, int]:
    import comfyui_version as version_module  # ComfyUI's root module, on sys.path when ComfyUI runs

    return flux_family.parse_version(version_module.__version__)


def model_family(model, source: str = "the model") -> flux_family.Detection:
    """The FLUX family member a MODEL is, from what ComfyUI's detection chose (its model config
    class and unet config): the pack's loader or core's. Raises ``flux_family.FamilyError``."""
    config = model.model.model_config
    return flux_family.identify(type(config).__name__, config.unet_config, source)
