"""The bundled workflows: each UI file is the same graph as its API twin, each twin fits the real
server's node definitions at its shipped (real-model) settings, and each runs end to end on the
tiny models through the headless client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fluxq_testing import comfyui_version
from PIL import Image

from lora_ops.flux_family import PRESET_NAMES
from lora_ops.workflow_convert import ui_to_api

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO_ROOT / "workflows"
CLIENT = REPO_ROOT / "scripts" / "fluxq_client.py"
TINY_MAP_PATH = REPO_ROOT / "scripts" / "tiny_model_map.json"
TINY_MAP = json.loads(TINY_MAP_PATH.read_text())
PACK_FOLDER = "comfyui-flux-qlora"  # the pack's folder name under custom_nodes in the harness
TINY_DATASET = TINY_MAP["my_dataset"]
TINY_EDIT_PAIRS = TINY_MAP["my_edit_pairs"]
TRAINED_LORA = "fluxq-workflow-test"
BAKED_GGUF = "fluxq-workflow-baked"


def tiny_text(title: str) -> list[str]:
    return [f"{title}.clip_name={TINY_MAP['clip_l.safetensors']}", f"{title}.type=flux1"]

TINY_PHOTO = TINY_MAP["my_photo.png"]  # the edit / inpaint input (its transparent square is Fill's mask)

# Small and fast on CPU; the shipped files keep the real 1024x1024, 28-step settings.
TINY_SIZE = ["Sampler settings.width=64", "Sampler settings.height=64"]
TINY_DEV = ["Sampler settings.preset=custom", "Sampler settings.steps=2", *TINY_SIZE]
TINY_TRAIN = [*TINY_DEV, "Train LoRA.steps=2", "Train LoRA.resolution=64", "Train LoRA.rank=4", "Train LoRA.alpha=4",
              "Train LoRA.save_every=0", f"Train LoRA.lora_name={TRAINED_LORA}"]
TINY_RUNS = {
    # name: (overrides, saved files expected as {downloaded name prefix: (width, height) or None})
    "flux_dev_gguf_lora_txt2img": (TINY_DEV, {"fluxq_dev_lora_": (64, 64)}),
    "flux_schnell_gguf_4step": (["Sampler settings.width=64", "Sampler settings.height=64"],
                                {"fluxq_schnell_": (64, 64)}),
    "flux_lora_compare_grid": ([*TINY_DEV, "LoRA compare grid.strengths=0, 1", 'LoRA compare grid.seeds=0'],
                               {"fluxq_lora_grid_": None}),
    "flux_lora_vs_lora": ([*TINY_DEV, "LoRA compare grid.strengths=1", 'LoRA compare grid.seeds=0'],
                          {"fluxq_lora_vs_lora_": None}),
    "flux_stack_then_remove_lora": (TINY_DEV, {"fluxq_stack_a_b_": (64, 64), "fluxq_stack_b_only_": (64, 64)}),
    "flux_lora_block_weights_grid": (
        ["Sampler settings.preset=custom", "Sampler settings.steps=1", "Sampler settings.width=64",
         "Sampler settings.height=64", "Block-weight rows.value=late: s*=0.5, d0=-1",
         "Chosen block weights.value=d0=0.5"],  # the shipped lines name FLUX.1's 19 + 38 blocks; tiny has 1 + 1
        {"fluxq_block_weight_grid_": None, "fluxq_block_weight_chosen_": (64, 64)}),
    "flux_bake_then_compare": ([*TINY_DEV, f"Bake into GGUF.save_name={BAKED_GGUF}"],
                               {"fluxq_bake_baked_": (64, 64), "fluxq_bake_runtime_lora_": (64, 64)}),
    "flux_train_then_compare": (
        [*TINY_TRAIN, "LoRA compare grid.strengths=0, 1"],
        {"fluxq_train_loss_": None, "fluxq_train_compare_": None},
    ),
    "flux_prepare_caption_train_compare": (
        [*TINY_TRAIN, "Train LoRA.steps=1", "LoRA compare grid.strengths=1", "Prepare and caption images.min_side=0"],
        {"fluxq_prepared_train_loss_": None, "fluxq_prepared_train_compare_": None},
    ),
    # The FLUX family. The tiny members read 768-wide text, which the tiny CLIP-L gives (type flux1);
    # the tiny FLUX.2 encoders and T5 are narrower (their exactness is test_text_encoders_gguf's).
    # custom keeps the shipped widgets, which are the preset's values (cfg, negative, schedule), on
    # fewer steps; the presets themselves are test_sampling_family's.
    "flux2_dev_gguf_lora_grid": (
        [*TINY_DEV, *tiny_text("Load text encoder (Mistral-Small 3.2)"), "LoRA compare grid.strengths=1",
         "LoRA compare grid.seeds=0"],
        {"fluxq_flux2_dev_lora_": (64, 64), "fluxq_flux2_dev_grid_": None},
    ),
    "flux2_klein_distilled_and_base": (  # distilled on its preset (4 steps), base on 2
        [*(f"Sampler settings ({v}).{s}=64" for v in ("distilled", "base") for s in ("width", "height")),
         "Sampler settings (base).preset=custom", "Sampler settings (base).steps=2",
         *tiny_text("Load text encoder (Qwen3-4B)")],
        {"fluxq_klein_distilled_": (64, 64), "fluxq_klein_base_": (64, 64)},
    ),
    # trained on (tiny) klein base for one step, then compared on base (cfg 5 with the negative, on
    # 2 steps) and on distilled (its preset's 4 steps)
    "flux2_klein_base_train_compare": (
        [*(f"Train LoRA (on klein base).{s}" for s in ("steps=1", "resolution=64", "rank=4", "alpha=4",
                                                         "save_every=0", f"lora_name={TRAINED_LORA}")),
         *(f"Sampler settings ({v}).{s}=64" for v in ("base", "distilled") for s in ("width", "height")),
         "Sampler settings (base).preset=custom", "Sampler settings (base).steps=2",
         *(f"LoRA compare grid ({v}).strengths=1" for v in ("base", "distilled")),
         "Prepare and caption images.min_side=0", *tiny_text("Load text encoder (Qwen3-4B)")],
        {"fluxq_klein_train_loss_": None, "fluxq_klein_train_compare_base_": None,
         "fluxq_klein_train_compare_distilled_": None},
    ),
    # the tiny FLUX.1 dev stands in for Kontext (the same tensors)
    "flux_kontext_lora_edit": ([*TINY_DEV, "Sampler settings.steps=1"], {"fluxq_kontext_edit_": (64, 64)}),
    "flux_kontext_train_edit_pairs": ([*TINY_TRAIN, "Train LoRA.steps=1", "Sampler settings.steps=1"],
                                      {"fluxq_kontext_pairs_loss_": None, "fluxq_kontext_pairs_compare_": None}),
    # Chroma's tiny model has ~0.6 B parameters (a fixed-size approximator): one step at cfg 5
    "chroma_gguf_txt2img": (
        [*TINY_DEV, "Sampler settings.steps=1", *tiny_text("Load text encoder (T5-XXL)")],
        {"fluxq_chroma_": (64, 64)},
    ),
    # the latent comes from InpaintModelConditioning: the tiny photo's size
    "flux_fill_inpaint": (["Sampler settings.preset=custom", "Sampler settings.steps=2"], {"fluxq_fill_": (64, 64)}),
}
# What ComfyUI 0.3.75 cannot build: the tiny FLUX.2 and Fill models (128 wide; its detection fixes
# the head count) and klein at all. The loader refuses them, naming the ComfyUI they need.
NEEDS_0_33 = {"flux2_dev_gguf_lora_grid", "flux2_klein_distilled_and_base", "flux2_klein_base_train_compare",
              "flux_fill_inpaint"}
NAMES = sorted(TINY_RUNS)
REAL_MODELS = ("flux1-dev-Q8_0.gguf", "flux1-schnell-Q4_K_S.gguf", "flux2-dev-Q4_K_M.gguf", "flux-2-klein-4b-Q8_0.gguf",
               "flux1-kontext-dev-Q8_0.gguf", "chroma-Q8_0.gguf", "flux1-fill-dev-Q8_0.gguf")


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def ui_workflow(name: str) -> dict:
    return load(WORKFLOWS / f"{name}.json")


def api_workflow(name: str) -> dict:
    return load(WORKFLOWS / "api" / f"{name}.json")


@pytest.fixture(scope="module")
def server(comfy_server):
    """The shared server, with the tiny training sets (the trainer's `dataset`: images, edit pairs)
    and the photo to edit in its input folder."""
    photo = comfy_server.input_dir / TINY_PHOTO
    if not photo.exists():
        image = Image.new("RGBA", (64, 64), (200, 120, 40, 255))
        image.paste((0, 0, 0, 0), (16, 16, 48, 48))  # LoadImage's mask: the transparent square
        image.save(photo)
    dataset = comfy_server.input_dir / TINY_DATASET
    if not dataset.exists():
        dataset.mkdir()
        for index, color in enumerate([(220, 40, 40), (40, 200, 60), (50, 60, 210), (230, 210, 40)]):
            Image.new("RGB", (64, 64), color).save(dataset / f"square_{index}.png")
            (dataset / f"square_{index}.txt").write_text(f"a plain square, colour {index}")
    pairs = comfy_server.input_dir / TINY_EDIT_PAIRS  # edit pairs: control/<name> before, <name> after
    if not pairs.exists():
        (pairs / "control").mkdir(parents=True)
        for index, (before, after) in enumerate([((220, 40, 40), (40, 60, 220)), ((40, 200, 60), (200, 60, 200))]):
            Image.new("RGB", (64, 64), before).save(pairs / "control" / f"pair_{index}.png")
            Image.new("RGB", (64, 64), after).save(pairs / f"pair_{index}.png")
            (pairs / f"pair_{index}.txt").write_text("swap the colour")
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


# --- files ----------------------------------------------------------------------------------------


def test_every_workflow_has_a_ui_file_and_an_api_twin():
    assert sorted(path.stem for path in WORKFLOWS.glob("*.json")) == NAMES
    assert sorted(path.stem for path in (WORKFLOWS / "api").glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_has_titles_groups_notes_and_real_model_names(name):
    workflow = ui_workflow(name)
    assert workflow["version"] == 0.4 and workflow["groups"]
    notes = [node for node in workflow["nodes"] if node["type"] == "Note"]
    assert notes and all(node.get("title") and node["widgets_values"][0].strip() for node in notes)
    text = json.dumps(workflow)
    assert "fluxq-tiny" not in text  # shipped with the names a user has; tests map them
    assert any(real in text for real in REAL_MODELS)
    all_settings = [node["inputs"] for node in api_workflow(name).values() if node["class_type"] == "FluxQSamplerSettings"]
    assert all_settings
    for settings in all_settings:  # shipped at the real size, on the member's own preset
        assert (settings["width"], settings["height"]) == (1024, 1024)
        assert settings["preset"] in PRESET_NAMES


# --- against the real server ----------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_exactly_its_api_twin(name, object_info):
    assert ui_to_api(ui_workflow(name), object_info) == api_workflow(name)


@pytest.mark.server
def test_ui_workflows_are_served_as_templates(server):
    assert sorted(server.get("/workflow_templates")[PACK_FOLDER]) == NAMES


def input_problems(prompt: dict, object_info: dict) -> list[str]:
    """What ComfyUI's validation would refuse: unknown nodes/inputs, missing inputs, values out of range."""
    problems = []
    for node_id, node in prompt.items():
        definition = object_info.get(node["class_type"])
        if definition is None:
            problems.append(f"{node_id}: unknown node {node['class_type']}")
            continue
        sections = definition["input"]
        specs = {**sections.get("required", {}), **sections.get("optional", {})}
        for name in sections.get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{node_id}.{name}: required input missing")
        for name, value in node["inputs"].items():
            if name not in specs:
                problems.append(f"{node_id}.{name}: not an input of {node['class_type']}")
                continue
            if isinstance(value, list):  # a link
                continue
            input_type, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            choices = input_type if isinstance(input_type, list) else options.get("options")
            if choices is not None and value not in choices:
                problems.append(f"{node_id}.{name}: {value!r} not in the server's list")
            if input_type in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
                problems.append(f"{node_id}.{name}: {value} outside [{options.get('min')}, {options.get('max')}]")
    return problems


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_api_twin_fits_the_servers_node_definitions_at_its_shipped_settings(name, object_info):
    # Only the model file names change (to the tiny models this server has); every other value is
    # checked as shipped: 1024x1024, 28 steps, rank 16, 1000 training steps, ...
    prompt = api_workflow(name)
    for node in prompt.values():
        node["inputs"] = {key: TINY_MAP.get(value, value) if isinstance(value, str) else value
                          for key, value in node["inputs"].items()}
    assert input_problems(prompt, object_info) == []


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs_end_to_end_on_the_tiny_models(name, server, models_dir, tmp_path):
    overrides, expected = TINY_RUNS[name]
    command = [sys.executable, str(CLIENT), str(WORKFLOWS / "api" / f"{name}.json"), "--server", server.url,
               "--map", str(TINY_MAP_PATH), "--out", str(tmp_path), "--timeout", "900"]
    for override in overrides:
        command += ["--set", override]
    loras = models_dir / "loras"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=960)
        if name in NEEDS_0_33 and comfyui_version(server) < (0, 33, 0):
            assert result.returncode != 0 and "needs ComfyUI 0.33.0 or newer" in result.stderr, result.stderr[-3000:]
            return
        assert result.returncode == 0, result.stderr[-3000:]
        saved = [Path(line) for line in result.stdout.split()]
        for prefix, size in expected.items():
            matches = [path for path in saved if path.name.startswith(prefix)]
            assert len(matches) == 1, (prefix, saved)
            with Image.open(matches[0]) as image:
                assert size is None or image.size == size
        if "train" in name:
            assert (loras / f"{TRAINED_LORA}.safetensors").is_file()
        if name == "flux_prepare_caption_train_compare":
            prepared = server.input_dir / f"{TINY_MAP['my_photos']}_prepared"
            assert sorted(p.name for p in prepared.glob("*.png")) == [f"square_{i}.png" for i in range(4)]
            assert len(list(prepared.glob("*.txt"))) == 4  # the tiny set's own captions, kept
        if name == "flux_kontext_train_edit_pairs":
            assert "2 edit pair(s): the control images enter as reference tokens" in server.log_tail(400)
    finally:
        for path in loras.glob(f"{TRAINED_LORA}*"):  # the trainer writes into the harness's models/loras
            path.unlink()
        (models_dir / "diffusion_models" / f"{BAKED_GGUF}.gguf").unlink(missing_ok=True)  # and the bake there
