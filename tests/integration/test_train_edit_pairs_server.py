"""Edit-pair LoRA training (FLUX.1 Kontext, FLUX.2 edit) through a real ComfyUI server: the control
image of each pair enters as reference tokens and the loss covers the target's tokens.

The learning test trains the tiny FLUX.2 [dev] (an edit model; hidden 128: seconds on a CPU, where
the 3072-wide tiny FLUX.1 takes ~10 s a step). The tiny FLUX.1 [dev] GGUF stands in for Kontext
(FLUX.1's architecture taking reference latents; both ComfyUIs give FLUX.1 models `ref_latents`) in
the refusal below and in the Kontext edit-pair workflow (test_workflows); test_trainer checks that
the control latents reach the FLUX forward. Losses are measured with the node itself: a run of one step reports the loss of the model it was given (its new LoRA starts
at zero) on a dataset, for a fixed seed (the same noise and timesteps for every model and set)."""

from __future__ import annotations

import uuid

import pytest
from comfy_server import ExecutionFailed
from fluxq_testing import TINY, comfyui_version

# The edit "swap the colour": red becomes blue and blue becomes red. What a target should be is
# known only from its control image, so a LoRA that lowers the loss on both directions uses the
# reference tokens.
TRAIN_SHADES = ((220, 30, 30), (200, 40, 60))
HELD_OUT_SHADES = ((235, 20, 45),)
INSTRUCTION = "swap the colour"
TRAIN_STEPS = 12


def swapped(colour):
    return colour[::-1]


def write_pairs(folder, pairs):
    """pairs: (stem, control colour, target colour); 64x64 flat images and the instruction."""
    from PIL import Image

    (folder / "control").mkdir(parents=True, exist_ok=True)
    for stem, control, target in pairs:
        Image.new("RGB", (64, 64), control).save(folder / "control" / f"{stem}.png")
        Image.new("RGB", (64, 64), target).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(INSTRUCTION)


def both_ways(shades):
    """Each shade edited to its swap and back: (stem, control, target)."""
    return [p for i, red in enumerate(shades)
            for p in ((f"r{i}", red, swapped(red)), (f"b{i}", swapped(red), red))]


def trainer(model, dataset, lora_name, **override):
    inputs = {
        "model": model, "vae": ["vae", 0], "clip": ["clip", 0], "dataset": dataset, "trigger_word": "",
        "rank": 8, "alpha": 8.0, "learning_rate": 1e-2, "steps": TRAIN_STEPS, "batch_size": 2,
        "gradient_accumulation": 1, "resolution": 64, "seed": 0, "optimizer": "adamw", "lr_schedule": "constant",
        "warmup_steps": 0, "caption_dropout": 0.0, "timestep_sampling": "uniform", "gradient_checkpointing": False,
        "layer_regex": "", "save_every": 0, "keep_last": 1, "lora_name": lora_name, "resume": "[none]"}
    return {"class_type": "FluxQTrainLoRA", "inputs": {**inputs, **override}}


def loaders(gguf=TINY["dev_gguf"]["Q8_0"], vae=TINY["vae"]):
    return {
        "model": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": gguf, "dequant_dtype": "auto"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY["clip_l"], "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
    }


def evaluation(model, dataset, lora_name, draws=2, batch_size=2):
    """One step's loss: `batch_size` pairs of `dataset` drawn `draws` times (accumulation)."""
    return trainer(model, dataset, lora_name, steps=1, batch_size=batch_size, gradient_accumulation=draws,
                   learning_rate=1e-7, seed=5, rank=1, alpha=1.0)


def run_and_read_losses(server, models_dir, graph, names):
    """Runs `graph`, whose trainers save under `names`; their loss histories, files deleted."""
    from lora_ops.lora_checkpoint import load_train_state

    files = {n: models_dir / "loras" / f"{n}.safetensors" for n in names}
    try:
        server.run(graph)
        return {n: load_train_state(str(path))[0].loss_history for n, path in files.items()}
    finally:
        for path in files.values():
            path.unlink(missing_ok=True)
            path.with_suffix(".trainstate").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def pair_sets(comfy_server):
    root = comfy_server.input_dir
    write_pairs(root / "swap_train", both_ways(TRAIN_SHADES))
    write_pairs(root / "swap_held_out", both_ways(HELD_OUT_SHADES))
    # the held-out targets with the wrong control images: each target's own colour (no swap)
    write_pairs(root / "swap_wrong", [(stem, target, target) for stem, _, target in both_ways(HELD_OUT_SHADES)])
    return root


@pytest.mark.server
def test_edit_lora_learns_from_the_control_image(comfy_server, models_dir, pair_sets):
    """FLUX.2 [dev] (an edit model: reference images as extra tokens): trained on swap-the-colour
    pairs, the LoRA lowers the loss on held-out pairs, and the same targets with the wrong control
    images give another loss: the reference tokens reach the prediction. (Measured on CPU: held-out
    loss 2.48 -> 1.60 after 12 steps, 1.45 after 20; the wrong controls move it by ~5e-4 only: in
    so few steps the tiny random model learns the colours' statistics, not yet to read the edit
    from the control; 30 steps gave the same.)"""
    if comfyui_version(comfy_server) < (0, 33, 0):
        # FLUX.1 (Kontext's architecture): test_trainer shows its control latents reach the forward on
        # both ComfyUIs; test_workflows trains the Kontext edit-pair workflow through this server
        pytest.skip("ComfyUI 0.3.75 cannot build the hidden-128 FLUX.2 tiny model")
    tag = uuid.uuid4().hex[:6]
    graph = {**loaders("fluxq-tiny-flux2-dev-Q8_0.gguf", "fluxq-tiny-flux2-ae.safetensors"),
             "train": trainer(["model", 0], "swap_train", f"edit_{tag}")}
    runs = {"base": (["model", 0], "swap_held_out"), "trained": (["train", 0], "swap_held_out"),
            "trained_wrong": (["train", 0], "swap_wrong")}
    for name, (model, dataset) in runs.items():
        graph[f"eval_{name}"] = evaluation(model, dataset, f"eval_{name}_{tag}")
    losses = run_and_read_losses(comfy_server, models_dir, graph, [f"edit_{tag}", *(f"eval_{n}_{tag}" for n in runs)])
    training = losses[f"edit_{tag}"]
    held = {name: losses[f"eval_{name}_{tag}"][0] for name in runs}
    print(f"edit pairs (FLUX.2 [dev]): train loss {training[:3]} .. {training[-3:]}; held-out {held}")
    assert len(training) == TRAIN_STEPS
    assert held["trained"] < 0.75 * held["base"], held
    # same noise and timesteps (seeded, deterministic on CPU): bit-equal losses if the control were unused
    assert abs(held["trained_wrong"] - held["trained"]) > 1e-5 * held["trained"], held


@pytest.mark.server
def test_broken_edit_pairs_are_an_execution_error_naming_the_files(comfy_server):
    folder = comfy_server.input_dir / "pairs_missing_control"
    write_pairs(folder, [("a", (0, 0, 255), (255, 0, 0))])
    from PIL import Image

    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "b.png")
    with pytest.raises(ExecutionFailed, match=r"target image\(s\) have no control image: 'b.png'"):
        comfy_server.run({**loaders(), "train": trainer(["model", 0], folder.name, "never_written")})
