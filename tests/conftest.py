"""Shared test setup: a real ComfyUI (as a library and as a server) with the pack and tiny models.

The harness (scripts/setup_harness.sh) provides ComfyUI 0.3.75 in .harness/ComfyUI, or the
user's checkout in $COMFYUI_PATH, with the tiny random FLUX models in its model folders.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".harness" / "ComfyUI")
# ComfyUI imports a pack by its folder path; in-process tests import it under this fixed name
# (the checkout's folder name may be anything, even "main", which ComfyUI's main.py shadows).
PACK_NAME = "comfyui_flux_qlora"

for path in (REPO_ROOT, REPO_ROOT / "scripts", REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from caption_stub import SERVER_ENV  # noqa: E402
from comfy_server import ComfyServer  # noqa: E402

if (COMFY_DIR / "main.py").exists() and str(COMFY_DIR) not in sys.path:
    # ComfyUI as a library: CPU mode, parsed once at import; without it comfy probes for CUDA.
    sys.path.insert(0, str(COMFY_DIR))
    _argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses the --cpu above)

    sys.argv = _argv



def _require_harness():
    if not (COMFY_DIR / "main.py").exists():
        pytest.fail(f"no ComfyUI at {COMFY_DIR}: run scripts/setup_harness.sh (make setup) first")


@pytest.fixture(scope="session")
def models_dir() -> Path:
    _require_harness()
    return COMFY_DIR / "models"


@pytest.fixture(scope="session")
def scratch_models(tmp_path_factory) -> Path:
    """Model folders for files the tests write (LoRAs, GGUFs), registered with both ComfyUIs."""
    root = tmp_path_factory.mktemp("fluxq_models")
    for folder in ("loras", "diffusion_models", "text_encoders"):
        (root / folder).mkdir()
    return root


@pytest.fixture(scope="session")
def clip_lora(scratch_models, models_dir) -> str:
    """The tiny FLUX LoRA plus a CLIP-L part (lora_te1_ keys on the first attention layer), in the
    scratch loras folder; returns its file name."""
    import torch
    from safetensors.torch import load_file, save_file

    from fluxq_testing import TINY

    tensors = load_file(str(models_dir / "loras" / TINY["lora"]))
    generator = torch.Generator().manual_seed(5)
    for proj in ("q_proj", "v_proj"):
        base = f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}"
        tensors[f"{base}.lora_down.weight"] = torch.randn(4, 768, generator=generator) / 768 ** 0.5
        tensors[f"{base}.lora_up.weight"] = torch.randn(768, 4, generator=generator)
        tensors[f"{base}.alpha"] = torch.tensor(4.0)
    name = "fluxq-tiny-lora-with-clip.safetensors"
    save_file(tensors, str(scratch_models / "loras" / name))
    return name


@pytest.fixture(scope="session")
def pack(scratch_models):
    """The pack imported in-process as ComfyUI would, with the scratch folders registered."""
    _require_harness()
    import importlib.util

    import folder_paths

    for folder in ("loras", "diffusion_models", "text_encoders"):
        folder_paths.add_model_folder_path(folder, str(scratch_models / folder))
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    importlib.import_module(PACK_NAME + ".nodes")
    return sys.modules[PACK_NAME]


@pytest.fixture(scope="session")
def comfy_server(scratch_models, tmp_path_factory):
    _require_harness()
    # started as its owner would: a caption key, and the caption stub's host approved for it
    server = ComfyServer(COMFY_DIR, tmp_path_factory.mktemp("comfy_server"), extra_model_root=scratch_models,
                         env=SERVER_ENV)
    yield server
    server.stop()
    if server.process.returncode not in (0, -15):
        print(server.log_tail())
