"""Plumbing figure for data-parallel training: 2 gloo ranks (batch 1 each) against 1 process
(batch 2) on the CPU, same global batch, same steps, through scripts/fluxq_train.py on the narrow
FLUX of the tests (hidden 128: the transformer is cheap, so the figure shows the overheads of
torch.distributed and of a second ComfyUI process, not a speed-up).

    .harness/venv/bin/python bench/bench_ddp_cpu.py --steps 20

Prints wall time (process start to exit: ComfyUI import, model build, dataset encoding, training),
the training steps' rate (the last step's it/s as the trainer logs it) and each rank's peak
resident memory. Each process gets --threads threads (default 1), so the two rows use 1 vs 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "integration" / "narrow_train_script.py"
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or REPO / ".harness" / "ComfyUI")


def run(ranks: int, steps: int, threads: int, root: Path) -> dict:
    inputs, loras = root / f"input{ranks}", root / f"loras{ranks}"
    (inputs / "set").mkdir(parents=True)
    loras.mkdir()
    for i, colour in enumerate([(220, 30, 30), (30, 200, 60), (30, 40, 220), (200, 200, 30)]):
        Image.new("RGB", (64, 64), colour).save(inputs / "set" / f"{i}.png")
        (inputs / "set" / f"{i}.txt").write_text(f"a square of colour {i}")
    settings = dict(dataset="set", rank=4, alpha=4.0, learning_rate=1e-3, steps=steps, batch_size=2 // ranks,
                    resolution=64, seed=0, caption_dropout=0.0, gradient_checkpointing=False, save_every=0,
                    lora_name="bench")
    (root / f"train{ranks}.json").write_text(json.dumps(settings))
    extra = root / f"extra{ranks}.yaml"
    extra.write_text(f"bench:\n    base_path: {root}\n    is_default: true\n    loras: {loras.name}\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    command = [*launcher, str(SCRIPT), str(root / f"train{ranks}.json"), "--cpu", "--comfyui", str(COMFY_DIR),
               "--input-directory", str(inputs), "--extra-model-paths-config", str(extra)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{log[-4000:]}")
    rates = re.findall(rf"step {steps}/{steps} .* ([0-9.]+) it/s", log)
    memory = {int(r): int(m) for r, m in re.findall(r"\[rank (\d+)\] fluxq_train: peak memory of this rank: (\d+) MiB", log)}
    return {"ranks": ranks, "wall_s": wall, "it_per_s": float(rates[-1]), "peak_mib": [memory[r] for r in sorted(memory)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(1, args.steps, args.threads, Path(tmp)), run(2, args.steps, args.threads, Path(tmp))]
    print("| processes | batch per process | wall time (s) | steps/s | peak RSS per process (MiB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['ranks']} | {2 // row['ranks']} | {row['wall_s']:.1f} | {row['it_per_s']:.2f} | "
              f"{', '.join(map(str, row['peak_mib']))} |")


if __name__ == "__main__":
    main()
