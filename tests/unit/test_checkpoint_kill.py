"""SIGKILL of a process writing training checkpoints (the trainer's save path, lora_checkpoint) at
random moments, many times: no truncated or mismatched LoRA / train state is ever visible, only
hidden temporary files are left, and the last complete checkpoint resumes. The same property on a
real training server is tests/integration/test_crash_safety.py."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

from lora_ops import lora_checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
WRITER = """
import sys, torch
sys.path.insert(0, {repo!r})
from lora_ops import lora_checkpoint as ckpt
from lora_ops.flow_match import TrainState
folder = {folder!r}
meta = ckpt.lora_metadata(base_model="tiny", rank=8, alpha=8.0, steps=0, trigger_word="TOK", image_count=1, resolution=64,
                          run_id="run1")
print("ready", flush=True)
for step in range(1, 10_000):
    factors = {{f"single_blocks.{{i}}.linear2": ckpt.LoraFactors(torch.full((8, 3072), float(step)), torch.full((3072, 8), float(step)))
               for i in range(4)}}
    optimizer = {{f"p{{i}}": {{"exp_avg": torch.full((8, 3072), float(step))}} for i in range(4)}}
    state = TrainState(step, [float(step)] * step, optimizer)
    name = ckpt.step_checkpoint_name("run", step) if step % 3 else "run.safetensors"  # every third: the final name
    ckpt.save_checkpoint(f"{{folder}}/{{name}}", factors, 8.0, {{**meta, "ss_steps": str(step)}}, state, {{"rank": 8}})
"""


def check_folder(folder: Path) -> int:
    """Every visible file reads in full and each LoRA agrees with its state; returns the newest
    complete step checkpoint's step (0: none yet)."""
    newest = 0
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            assert path.name.endswith(".tmp") or path.name.startswith(".tmp"), path.name  # ours or safetensors'
            continue
        with safe_open(str(path), framework="pt") as f:  # raises on a truncated file
            tensors = [f.get_tensor(k) for k in f.keys()]
            metadata = f.metadata()
        if path.suffix == ".safetensors":
            step = int(metadata["ss_steps"])
            assert all(float(t.flatten()[0]) in (step, 8.0) for t in tensors), path.name  # factors of that step
            if path.with_suffix(".trainstate").exists():
                try:
                    state, _ = ckpt.load_train_state(str(path))
                except ckpt.CheckpointError as error:
                    # killed between the state and the LoRA of a name an earlier attempt wrote: refused
                    assert "another save" in str(error) and "run_stepNNNNNN" in str(error)
                    continue
                assert state.step == step and state.loss_history == [float(step)] * step
                if "_step" in path.name:
                    newest = max(newest, step)
    return newest


def test_sigkill_at_random_moments_leaves_only_complete_checkpoints(tmp_path):
    rng = random.Random(15)
    kills = 8
    for attempt in range(kills):
        process = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), folder=str(tmp_path))],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        check_folder(tmp_path)
    assert any(p.name.startswith("run_step") for p in tmp_path.iterdir()), "the writer never finished a checkpoint"
