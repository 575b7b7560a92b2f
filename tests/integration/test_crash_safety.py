"""Crash safety of training files: a real ComfyUI server training on the tiny GGUF is killed with
SIGKILL during a step, during a step checkpoint's write and during the final save, and cancelled
with ComfyUI's own cancel (`POST /interrupt`) in the middle of a step. After each kill
every LoRA / train state under models/loras reads in full, a LoRA beside a newer state is refused
for resuming, and resuming from the last complete checkpoint reproduces the loss curve (and the
LoRA) of an uninterrupted run.

Three server starts for three kills: the step kill comes from outside at a moment seen in the
folder (a step takes seconds); the two write kills are armed at an exact point, because a
checkpoint write lasts a millisecond: a hook in the server process (`KILL_HOOK`) sends SIGKILL to
the server itself when it is about to rename a fully written temporary file onto the armed name.
Kills at random moments inside the writes themselves are tests/unit/test_checkpoint_kill.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from comfy_server import ComfyServer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_ops.lora_checkpoint import CheckpointError, load_train_state

TINY_CLIP_L, TINY_VAE, TINY_DEV_Q8 = "fluxq-tiny-clip_l.safetensors", "fluxq-tiny-ae.safetensors", "fluxq-tiny-dev-Q8_0.gguf"
STEPS = 3

pytestmark = pytest.mark.server

# A sitecustomize for the server process: os.replace onto the name in $FLUXQ_KILL_AT_FILE kills it.
KILL_HOOK = '''
import os, signal

_replace = os.replace


def _replace_unless_armed(src, dst, *args, **kwargs):
    try:
        with open(os.environ["FLUXQ_KILL_AT_FILE"]) as f:
            armed = f.read().strip()
    except OSError:
        armed = ""
    if armed and os.path.basename(os.fspath(dst)) == armed:
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)


os.replace = _replace_unless_armed
'''


def training_prompt(name: str, resume: str = "[none]", **inputs) -> dict:
    prompt = {
        "model": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY_DEV_Q8, "dequant_dtype": "auto"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_CLIP_L, "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_VAE}},
        "train": {"class_type": "FluxQTrainLoRA", "inputs": {
            "model": ["model", 0], "vae": ["vae", 0], "clip": ["clip", 0], "dataset": "set", "trigger_word": "TOK",
            "rank": 2, "alpha": 2.0, "learning_rate": 1e-3, "steps": STEPS, "batch_size": 1,
            "gradient_accumulation": 1, "resolution": 64, "seed": 3, "optimizer": "adamw", "lr_schedule": "constant",
            "warmup_steps": 0, "caption_dropout": 0.0, "timestep_sampling": "shift", "gradient_checkpointing": False,
            "layer_regex": r"^single_blocks\.0\.linear2$", "save_every": 1, "keep_last": 0, "lora_name": name,
            "resume": resume}},
    }
    prompt["train"]["inputs"].update(inputs)
    return prompt


class Lab:
    """A private models/loras (the server's default, where the trainer saves), an input dataset and
    the kill hook."""

    def __init__(self, comfy_dir: Path, root: Path):
        self.comfy_dir, self.root = comfy_dir, root
        self.models = root / "models"
        for folder in ("loras", "diffusion_models", "text_encoders"):
            (self.models / folder).mkdir(parents=True, exist_ok=True)
        self.loras = self.models / "loras"
        hook = root / "kill_hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(KILL_HOOK)
        self.armed = root / "kill_at"
        self.env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
                    "FLUXQ_KILL_AT_FILE": str(self.armed)}
        self.server: ComfyServer | None = None

    def start(self) -> ComfyServer:
        self.arm("")
        workdir = self.root / f"server-{uuid.uuid4().hex[:6]}"
        workdir.mkdir()
        self.server = ComfyServer(self.comfy_dir, workdir, extra_model_root=self.models, extra_models_first=True,
                                  env=self.env)
        dataset = self.server.input_dir / "set"
        dataset.mkdir()
        for name, colour in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
            Image.new("RGB", (64, 64), colour).save(dataset / f"{name}.png")
            (dataset / f"{name}.txt").write_text(f"a {name} square")
        return self.server

    def arm(self, file_name: str) -> None:
        """The server kills itself when it is about to make `file_name` visible ("" disarms)."""
        self.armed.write_text(file_name)

    def queue(self, prompt: dict) -> str:
        status, body = self.server.post_prompt(prompt)
        assert status == 200, body
        return body["prompt_id"]

    def _gone(self) -> None:
        self.server._log.close()
        self.server = None

    def kill_when(self, seen, too_late: str, timeout: float = 300) -> None:
        """SIGKILL from outside the moment `seen(files in loras)` holds; fails once `too_late` exists."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            files = set(os.listdir(self.loras))
            if seen(files):
                os.kill(self.server.process.pid, signal.SIGKILL)
                self.server.process.wait(timeout=60)
                return self._gone()
            if too_late in files or self.server.process.poll() is not None:
                raise AssertionError(f"the kill point passed unseen ({sorted(files)})\n{self.server.log_tail()}")
            time.sleep(0.01)
        raise TimeoutError(f"kill point not reached in {timeout}s\n{self.server.log_tail()}")

    def wait_for_armed_kill(self, timeout: float = 300) -> None:
        try:
            code = self.server.process.wait(timeout=timeout)
        except Exception:
            raise TimeoutError(f"the armed kill did not happen in {timeout}s\n{self.server.log_tail()}") from None
        assert code == -signal.SIGKILL, f"exit code {code}\n{self.server.log_tail()}"
        self._gone()


def queue_and_wait_for_step(server: ComfyServer, prompt: dict, step: int, timeout: float = 300) -> tuple[str, int]:
    """Queues `prompt` as the browser does (its client id on ComfyUI's websocket) and returns once
    the node "train" reports `step` on its progress bar: (prompt id, the step reported)."""
    import aiohttp

    async def watch():
        client_id = uuid.uuid4().hex
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                body = await r.json()
                assert r.status == 200, body
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                data = event.get("data", {})
                if event["type"] == "execution_error":
                    raise AssertionError(f"training failed: {data}")
                if event["type"] == "progress" and data.get("node") == "train" and data["value"] >= step:
                    return body["prompt_id"], data["value"]
            raise AssertionError("the websocket closed before the step was reported")

    try:
        return asyncio.run(asyncio.wait_for(watch(), timeout))
    except TimeoutError:
        raise TimeoutError(f"step {step} not reported in {timeout}s\n{server.log_tail()}") from None


def visible_checkpoints(loras: Path, prefix: str) -> tuple[dict[str, int], set[str]]:
    """Every .safetensors / .trainstate ComfyUI or the trainer would pick up reads in full (a
    truncated or corrupt file raises here); leftovers of interrupted writes are hidden .tmp files.
    Returns the step of each `prefix` LoRA whose train state belongs to it, and the `prefix` LoRAs
    whose state is from another save (resuming refuses them)."""
    steps, refused = {}, set()
    for path in sorted(loras.iterdir()):
        if path.name.startswith("."):
            assert path.name.endswith(".tmp"), path.name
            continue
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
        assert tensors or path.suffix == ".trainstate", path.name
        if path.suffix != ".safetensors" or not path.name.startswith(prefix):
            continue
        assert path.with_suffix(".trainstate").exists(), f"{path.name} without its train state"
        try:
            state, _ = load_train_state(str(path))
        except CheckpointError as error:
            assert "from another save" in str(error), error
            refused.add(path.name)
            continue
        assert metadata["ss_steps"] == str(state.step) and len(state.loss_history) == state.step
        steps[path.name] = state.step
    return steps, refused


def hidden_leftovers(loras: Path) -> set[str]:
    """The final names of the interrupted writes (`.NAME.PID.tmp` -> NAME)."""
    return {name[1:].rsplit(".", 2)[0] for name in os.listdir(loras) if name.startswith(".")}


def test_sigkill_never_leaves_a_partial_lora_and_resume_reproduces_the_run(tmp_path, models_dir):
    lab = Lab(models_dir.parent, tmp_path)
    try:
        # server 1: the uninterrupted reference run, then a run killed from outside during step 2
        lab.start()
        lab.server.run(training_prompt("ref"))
        reference = load_train_state(str(lab.loras / "ref.safetensors"))[0].loss_history
        assert len(reference) == STEPS
        lab.queue(training_prompt("cut"))
        lab.kill_when(lambda files: "cut_step000001.safetensors" in files, too_late="cut_step000002.trainstate")
        assert visible_checkpoints(lab.loras, "cut") == ({"cut_step000001.safetensors": 1}, set())

        # server 2: resumed, killed during the step-2 checkpoint: its state is renamed, its LoRA is
        # fully written but still under the temporary name
        lab.start()
        lab.arm("cut_step000002.safetensors")
        lab.queue(training_prompt("cut", resume="cut_step000001.safetensors"))
        lab.wait_for_armed_kill()
        assert visible_checkpoints(lab.loras, "cut") == ({"cut_step000001.safetensors": 1}, set())
        assert (lab.loras / "cut_step000002.trainstate").exists()
        assert hidden_leftovers(lab.loras) == {"cut_step000002.safetensors"}

        # server 3: resumed from the last complete checkpoint, uninterrupted: the reference's curve
        # and LoRA from that step on
        lab.start()
        lab.server.run(training_prompt("cut", resume="cut_step000001.safetensors"))
        resumed = load_train_state(str(lab.loras / "cut.safetensors"))[0].loss_history
        assert resumed[:1] == reference[:1]  # carried over from the checkpoint
        assert resumed == pytest.approx(reference, rel=1e-5, abs=1e-7)
        ref_lora, cut_lora = load_file(str(lab.loras / "ref.safetensors")), load_file(str(lab.loras / "cut.safetensors"))
        assert ref_lora.keys() == cut_lora.keys()
        for key in ref_lora:
            torch.testing.assert_close(cut_lora[key], ref_lora[key], rtol=1e-5, atol=1e-7)
        steps, refused = visible_checkpoints(lab.loras, "cut")
        assert (steps, refused) == ({"cut_step000001.safetensors": 1, "cut_step000002.safetensors": 2,
                                     "cut.safetensors": STEPS}, set())

        # ... then the final save of a second resume is killed between its state and its LoRA:
        # the earlier cut.safetensors stays whole, and beside the newer state it is refused
        final_bytes = (lab.loras / "cut.safetensors").read_bytes()
        lab.arm("cut.safetensors")
        lab.queue(training_prompt("cut", resume="cut_step000002.safetensors"))
        lab.wait_for_armed_kill()
        assert (lab.loras / "cut.safetensors").read_bytes() == final_bytes
        steps, refused = visible_checkpoints(lab.loras, "cut")
        assert (steps, refused) == ({"cut_step000001.safetensors": 1, "cut_step000002.safetensors": 2},
                                    {"cut.safetensors"})
        assert hidden_leftovers(lab.loras) == {"cut_step000002.safetensors", "cut.safetensors"}
    finally:
        if lab.server is not None:
            lab.server.stop()


def test_cancel_in_the_server_saves_the_last_finished_step_and_replaces_the_earlier_run_only_then(tmp_path, models_dir):
    """What a user does: train under a name an earlier run used (replace_existing on), press
    cancel while step 2 runs (ComfyUI raises the interrupt inside a layer's forward, or in its
    progress hook if the step just ended), then resume from the file the node named. First, on the
    same server: ComfyUI titles its error dialog with `exception_type`, which for the pack's errors
    used to be the pack's folder path with `.lora_ops.dataset.DatasetError` appended."""
    lab = Lab(models_dir.parent, tmp_path)
    lab.env["PYTHONUNBUFFERED"] = "1"  # the server's log is read below
    try:
        server = lab.start()
        (server.input_dir / "no_images").mkdir()  # a choice ComfyUI 0.33 validates, holding nothing
        status, body = server.post_prompt(training_prompt("x", class_prompt="a square", class_images="no_images"))
        assert status == 200, body
        entry = server.wait(body["prompt_id"])
        error, = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert error["exception_type"] == "fluxq.DatasetError"
        assert error["exception_message"].startswith("class_images: dataset 'no_images' holds no images")

        server.run(training_prompt("cut", steps=1))  # the earlier run: cut.safetensors
        earlier = load_file(str(lab.loras / "cut.safetensors"))

        prompt_id, seen = queue_and_wait_for_step(
            server, training_prompt("cut", steps=50, save_every=0, replace_existing=True), step=1)
        # step 1 is done and saved nowhere yet: the earlier run's files are still there
        assert sorted(os.listdir(lab.loras)) == ["cut.safetensors", "cut.trainstate"]
        server.post("/interrupt", {})
        entry = server.wait(prompt_id)
        kinds = [m[0] for m in entry["status"]["messages"]]
        assert "execution_interrupted" in kinds and "execution_error" not in kinds, entry["status"]

        steps, refused = visible_checkpoints(lab.loras, "cut")
        assert not refused and len(steps) == 1, steps
        (saved, step), = steps.items()
        # the last step that finished before the cancel took effect: the one reported, or the
        # next if it ended between the report and the press
        assert saved == f"cut_step{step:06d}.safetensors" and step in (seen, seen + 1), (saved, seen)
        assert f"cancelled after step {step}/50: saved {saved}" in server.log_tail(200)
        assert not (lab.loras / "cut.safetensors").exists(), "the earlier run was replaced once this one saved"
        assert load_file(str(lab.loras / saved)).keys() == earlier.keys()

        history = load_train_state(str(lab.loras / saved))[0].loss_history
        server.run(training_prompt("cut", resume=saved, steps=step + 1, save_every=0))
        resumed = load_train_state(str(lab.loras / "cut.safetensors"))[0].loss_history
        assert len(resumed) == step + 1 and resumed[:step] == history
    finally:
        if lab.server is not None:
            lab.server.stop()

