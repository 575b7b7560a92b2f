"""scripts/fluxq_train.py: the node's training outside the graph, alone and data-parallel under
torchrun (gloo on the CPU), checked against the node run in-process on the same models."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fluxq_testing import comfyui_is_0_33
from test_trainer import (  # noqa: F401  (clip_vae, comfy_libs, folders are fixtures)
    TINY_CLIP_L,
    TINY_DEV_Q8,
    clip_vae,
    comfy_libs,
    folders,
    lora_tensors,
    narrow_flux,
    node_args,
    train,
    write_dataset,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or REPO / ".harness" / "ComfyUI")
NARROW_SCRIPT = HERE / "narrow_train_script.py"
SCRIPT = REPO / "scripts" / "fluxq_train.py"
SETTINGS = dict(dataset="set", trigger_word="TOK", rank=4, alpha=4.0, learning_rate=1e-3, resolution=64, seed=3,
                optimizer="adamw", lr_schedule="cosine", warmup_steps=1, caption_dropout=0.3,
                timestep_sampling="shift", gradient_checkpointing=True, layer_regex="", keep_last=0)


def script_command(script: Path, settings: dict, tmp_path: Path, inputs: Path, loras: Path, ranks: int = 1) -> list[str]:
    """The script's command line; its LoRAs go to the test's `loras` folder (made ComfyUI's default)."""
    settings_file = tmp_path / "train.json"
    settings_file.write_text(json.dumps(settings))
    extra = tmp_path / "extra_model_paths.yaml"
    extra.write_text(f"fluxq_test:\n    base_path: {loras.parent}\n    is_default: true\n    loras: {loras.name}\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    return [*launcher, str(script), str(settings_file), "--cpu", "--comfyui", str(COMFY_DIR),
            "--input-directory", str(inputs), "--extra-model-paths-config", str(extra), "--timeout", "60"]


def script_env() -> dict:
    # two ranks on a small machine: one thread each, or they fight over the cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def assert_same_lora(a: Path, b: Path, rtol=1e-4, atol=1e-6):
    ta, _ = lora_tensors(a)
    tb, _ = lora_tensors(b)
    assert ta.keys() == tb.keys()
    moved = [k for k in ta if k.endswith("lora_up.weight") and ta[k].abs().max() > 0]
    assert moved, "the up matrices start at zero and must have moved"
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


# klein through the script's own loaders (its files; the tiny klein reads CLIP-L's width), the node
# run in-process on the same loaders' models
KLEIN_FILES = dict(model="fluxq-tiny-flux2-klein-4b-Q8_0.gguf", clip=TINY_CLIP_L, clip_type="flux1",
                   vae="fluxq-tiny-flux2-ae.safetensors")


def member_models(member, comfy_libs, clip_vae, models_dir):
    """(script, the script's model settings, a fresh model per call, clip, vae) of one member."""
    if member == "flux1":
        return NARROW_SCRIPT, {}, narrow_flux, *clip_vae
    if not comfyui_is_0_33():
        pytest.skip("ComfyUI 0.3.75 cannot load klein (the refusal: test_flux_family_server.py)")
    glue = comfy_libs.glue  # the script's loaders, as its load_models calls them
    clip = glue.load_text_encoders(str(models_dir / "text_encoders" / TINY_CLIP_L), None, "flux1")
    vae = glue.load_vae(str(models_dir / "vae" / KLEIN_FILES["vae"]))

    def model():
        return glue.load_diffusion_model(str(models_dir / "diffusion_models" / KLEIN_FILES["model"]))

    return SCRIPT, KLEIN_FILES, model, clip, vae


@pytest.mark.parametrize("member", ["flux1", "klein"])
def test_two_ranks_train_like_one_process_with_the_global_batch_and_one_process_resumes(
        comfy_libs, clip_vae, folders, models_dir, tmp_path, member):
    """2 ranks x batch 1 x accumulation 2 == 1 process x batch 2 x accumulation 2; the 2-rank step
    checkpoint resumed by the node in one process ends where the 2-rank run ended. FLUX.1 (a narrow
    model handed to the script) and klein (FLUX.2's conditioning path, loaded from its files)."""
    from lora_ops.lora_checkpoint import load_train_state

    script, files, new_model, clip, vae = member_models(member, comfy_libs, clip_vae, models_dir)
    inputs, loras = folders
    write_dataset(inputs, ["red", "green", "blue", "stripes"])
    # SGD: its update is proportional to the gradient, so a rank's gradient counted twice or
    # not averaged shows (Adam's first steps are about +-lr whatever the gradient's scale)
    settings = dict(SETTINGS, steps=4, batch_size=1, gradient_accumulation=2, save_every=2, lora_name="ddp",
                    optimizer="sgd", learning_rate=0.05)
    done = subprocess.run(script_command(script, dict(settings, **files), tmp_path, inputs, loras, ranks=2),
                          env=script_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(os.listdir(loras)) == ["ddp.safetensors", "ddp.trainstate",
                                         "ddp_step000002.safetensors", "ddp_step000002.trainstate"]

    one = dict(settings, batch_size=2, save_every=0)
    train(comfy_libs, node_args(new_model(), clip, vae, **dict(one, lora_name="single")))
    assert_same_lora(loras / "ddp.safetensors", loras / "single.safetensors")
    ddp_losses = load_train_state(str(loras / "ddp.safetensors"))[0].loss_history
    single_losses = load_train_state(str(loras / "single.safetensors"))[0].loss_history
    assert len(ddp_losses) == 4 and ddp_losses == pytest.approx(single_losses, rel=1e-4)

    comfy_libs.folder_paths.filename_list_cache.clear()
    train(comfy_libs, node_args(new_model(), clip, vae,
                                **dict(one, lora_name="resumed", resume="ddp_step000002.safetensors")))
    assert_same_lora(loras / "ddp.safetensors", loras / "resumed.safetensors")
    resumed_losses = load_train_state(str(loras / "resumed.safetensors"))[0].loss_history
    assert resumed_losses == pytest.approx(ddp_losses, rel=1e-4)


def test_a_killed_rank_fails_the_run_without_a_partial_checkpoint(folders, tmp_path):
    from lora_ops.lora_checkpoint import load_checkpoint, load_train_state

    inputs, loras = folders
    write_dataset(inputs, ["red", "blue"])
    settings = dict(SETTINGS, steps=500, batch_size=1, save_every=1, keep_last=0, lora_name="killed",
                    gradient_checkpointing=False)
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        run = subprocess.Popen(script_command(NARROW_SCRIPT, settings, tmp_path, inputs, loras, ranks=2),
                               env=script_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while "step 2/500" not in log_path.read_text(errors="replace"):
            assert run.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "training did not reach step 2"
            time.sleep(0.5)
        pid = int(re.search(r"\[rank 1\] fluxq_train: rank 1 of 2, pid (\d+)", log_path.read_text()).group(1))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        code = run.wait(timeout=120)
        failed_after = time.monotonic() - killed
    finally:
        if run.poll() is None:
            run.kill()
    assert code != 0
    assert failed_after < 90, f"the run took {failed_after:.0f} s to fail after a rank died"
    files = sorted(os.listdir(loras))
    assert "killed.safetensors" not in files
    assert not [f for f in files if f.startswith(".")], f"temporary files left behind: {files}"
    checkpoints = [f for f in files if f.endswith(".safetensors")]
    assert checkpoints, "rank 0 saved step checkpoints before the kill"
    for name in checkpoints:  # each checkpoint that exists is whole and matches its state
        step = int(re.search(r"_step(\d+)", name).group(1))
        factors, _, metadata = load_checkpoint(str(loras / name), narrow_module_paths())
        state, _ = load_train_state(str(loras / name))
        assert metadata["ss_steps"] == str(step) and state.step == step and len(state.loss_history) == step
        assert len(factors) == 13


def start_and_signal_after(command: list[str], log_path: Path, step: int, signum: int, group: bool = False):
    """Starts the script, sends `signum` once its log shows `step` (to its whole process group with
    `group`, as a terminal's Ctrl-C does) and returns (exit code, log)."""
    with open(log_path, "w") as log:
        run = subprocess.Popen(command, env=script_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=group)
    try:
        deadline = time.monotonic() + 600
        while f"step {step}/" not in log_path.read_text(errors="replace"):
            assert run.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, f"training did not reach step {step}"
            time.sleep(0.2)
        os.killpg(run.pid, signum) if group else run.send_signal(signum)
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    return code, log_path.read_text(errors="replace")


def last_logged_step(log: str) -> int:
    return int(re.findall(r"step (\d+)/500", log)[-1])


def test_sigint_and_sigterm_save_the_last_finished_step_and_resume_continues(folders, tmp_path):
    """Ctrl-C, then SIGTERM on the resumed run: each stops after the step in progress, saves it,
    names the file, and exits 130 (on ComfyUI 0.33 the interrupt used to end in a traceback)."""
    from lora_ops.lora_checkpoint import load_train_state

    inputs, loras = folders
    write_dataset(inputs, ["red", "blue"])
    settings = dict(SETTINGS, steps=500, batch_size=1, save_every=0, lora_name="sig", gradient_checkpointing=False)
    code, log = start_and_signal_after(script_command(NARROW_SCRIPT, settings, tmp_path, inputs, loras),
                                       tmp_path / "sigint.log", 2, signal.SIGINT)
    step = last_logged_step(log)
    saved = f"sig_step{step:06d}.safetensors"
    assert code == 130, log[-4000:]
    assert f"fluxq_train: cancelled after step {step}/500: saved {saved}" in log and "Traceback" not in log
    assert sorted(os.listdir(loras)) == [saved, saved.replace(".safetensors", ".trainstate")]
    first = load_train_state(str(loras / saved))[0].loss_history
    assert len(first) == step

    resumed = dict(settings, resume=saved)
    code, log = start_and_signal_after(script_command(NARROW_SCRIPT, resumed, tmp_path, inputs, loras),
                                       tmp_path / "sigterm.log", step + 2, signal.SIGTERM)
    later = last_logged_step(log)
    assert code == 130 and later >= step + 2, log[-4000:]
    assert f"saved sig_step{later:06d}.safetensors" in log and "Traceback" not in log
    continued = load_train_state(str(loras / f"sig_step{later:06d}.safetensors"))[0].loss_history
    assert len(continued) == later and continued[:step] == first


def test_ctrl_c_under_torchrun_stops_both_ranks_at_one_step_and_rank_0_saves_it_once(folders, tmp_path):
    inputs, loras = folders
    write_dataset(inputs, ["red", "blue"])
    settings = dict(SETTINGS, steps=500, batch_size=1, save_every=0, lora_name="ddp", gradient_checkpointing=False)
    _, log = start_and_signal_after(script_command(NARROW_SCRIPT, settings, tmp_path, inputs, loras, ranks=2),
                                    tmp_path / "torchrun.log", 2, signal.SIGINT, group=True)
    step = last_logged_step(log)
    saved = f"ddp_step{step:06d}.safetensors"
    assert sorted(os.listdir(loras)) == [saved, saved.replace(".safetensors", ".trainstate")], log[-4000:]
    assert log.count("FluxQTrainLoRA: saved ") == 1
    assert f"fluxq_train: cancelled after step {step}/500: saved {saved}" in log
    assert f"fluxq_train: rank 1: cancelled after step {step}/500; rank 0 writes {saved}" in log
    rank1 = [line for line in log.splitlines() if "rank 1" in line]
    assert not [line for line in rank1 if "saved" in line], rank1


def narrow_module_paths() -> list[str]:
    return [path for path, _ in narrow_flux().model.diffusion_model.named_modules()]


def test_script_and_node_resume_each_other_on_the_gguf_model(comfy_libs, clip_vae, folders, models_dir, tmp_path):
    """The script on the harness's files (its own loaders: GGUF transformer, CLIP-L, VAE) picks up
    the node's checkpoint, and the node picks up the script's: one run in three pieces."""
    from lora_ops.lora_checkpoint import load_train_state

    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red", "stripes"])
    settings = dict(SETTINGS, batch_size=1, gradient_accumulation=1, save_every=0, gradient_checkpointing=False,
                    caption_dropout=0.0)
    with torch.inference_mode():
        model = comfy_libs.glue.load_flux_gguf(str(models_dir / "diffusion_models" / TINY_DEV_Q8))
    train(comfy_libs, node_args(model, clip, vae, **dict(settings, steps=1, lora_name="node1")))

    files = dict(model=TINY_DEV_Q8, clip="fluxq-tiny-clip_l.safetensors", vae="fluxq-tiny-ae.safetensors")
    done = subprocess.run(
        script_command(SCRIPT, dict(settings, **files, steps=2, lora_name="script2", resume="node1.safetensors"),
                       tmp_path, inputs, loras),
        env=script_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]

    comfy_libs.folder_paths.filename_list_cache.clear()
    train(comfy_libs, node_args(model, clip, vae, **dict(settings, steps=3, lora_name="node3",
                                                         resume="script2.safetensors")))
    histories = [load_train_state(str(loras / f"{name}.safetensors"))[0].loss_history
                 for name in ("node1", "script2", "node3")]
    assert [len(h) for h in histories] == [1, 2, 3]
    assert histories[2][:2] == histories[1] and histories[1][:1] == histories[0]
    _, metadata = lora_tensors(loras / "node3.safetensors")
    assert metadata["ss_steps"] == "3"


def test_settings_errors_name_the_setting(tmp_path):
    """Bad settings files fail before ComfyUI is even loaded, naming the input."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed\n")
    done = subprocess.run([sys.executable, str(SCRIPT), str(bad), "--cpu", "--comfyui", str(COMFY_DIR)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not valid YAML" in done.stderr


@pytest.mark.parametrize("given,message", [
    (dict(stepz=3), "unknown setting(s) stepz"),
    (dict(steps="3"), "'steps' must be an integer"),
    (dict(steps=0), "'steps': 0 is outside 1..100000"),
    (dict(optimizer="lion"), "'optimizer': 'lion' is not one of"),
    (dict(gradient_checkpointing="yes"), "'gradient_checkpointing' must be true or false"),
    (dict(images=[1]), "images come from other nodes"),
    (dict(sample_settings={"steps": 2}), "sample_settings come from other nodes"),
    (dict(ema_decay=1.5), "'ema_decay': 1.5 is outside 0.0..0.9999"),
    (dict(class_images="nowhere"), "'class_images': 'nowhere' is not one of"),
])
def test_settings_are_checked_against_the_node_schema(comfy_libs, given, message):
    sys.path.insert(0, str(REPO / "scripts"))
    import fluxq_train

    with pytest.raises(fluxq_train.SettingsError, match=re.escape(message)):
        fluxq_train.node_settings(comfy_libs.train.FluxQTrainLoRA, given)
    defaults = fluxq_train.node_settings(comfy_libs.train.FluxQTrainLoRA, {"steps": 7})
    # PyYAML reads `learning_rate: 1e-4` as the text "1e-4" (YAML 1.1 wants a decimal point)
    import yaml

    given_lr = yaml.safe_load("learning_rate: 1e-4\nalpha: 2E+1\n")
    assert given_lr == {"learning_rate": "1e-4", "alpha": "2E+1"}
    read = fluxq_train.node_settings(comfy_libs.train.FluxQTrainLoRA, given_lr)
    assert (read["learning_rate"], read["alpha"]) == (1e-4, 20.0)
    with pytest.raises(fluxq_train.SettingsError, match="'learning_rate' must be a number, not 'nan'"):
        fluxq_train.node_settings(comfy_libs.train.FluxQTrainLoRA, {"learning_rate": "nan"})
    assert defaults["steps"] == 7 and defaults["rank"] == 16 and defaults["resume"] == "[none]"
    # the trainer's optional additions take their off defaults; sample_settings is not a setting
    assert {k: defaults[k] for k in ("ema_decay", "lora_dropout", "cache_latents_to_disk", "sample_every",
                                     "class_prompt", "class_images", "prior_loss_weight")} == {
        "ema_decay": 0.0, "lora_dropout": 0.0, "cache_latents_to_disk": False, "sample_every": 0,
        "class_prompt": "", "class_images": "[none]", "prior_loss_weight": 1.0}
    assert "sample_settings" not in defaults
