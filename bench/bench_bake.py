"""Figures for the README's bake table, on the tiny FLUX of the harness (hidden 3072, one double and
one single block, ~535M weights) on the CPU:

    .harness/venv/bin/python bench/bench_bake.py [--types Q8_0,Q4_K] [--json bench/results/bake.json]

For each type: the float tiny model (fluxq-tiny-dev.safetensors) with the tiny LoRA at strength 1
(runtime) is baked by FluxQSaveGGUF's code path; the file's size, the bake's wall time, and the mean
and max over its matrices of ||dequantized baked - float merge||_F / ||float merge||_F. Then the
time of one sampling step (64x64, euler, the median of --repeats after a warm-up) of the baked file
against its type's harness GGUF with the same LoRA applied at run time, where the harness has one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests")]

from fluxq_train import PACK_NAME, bootstrap_comfyui, import_pack

ALL_TYPES = "F16,BF16,Q8_0,Q5_1,Q5_0,Q4_1,Q4_0,Q6_K,Q5_K,Q4_K,Q3_K,Q2_K"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=ALL_TYPES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    comfy_dir = os.environ.get("COMFYUI_PATH") or str(REPO / ".harness" / "ComfyUI")
    bootstrap_comfyui(comfy_dir, cpu=True)
    import_pack()
    import torch
    from fluxq_testing import TINY, sample

    glue = importlib.import_module(f"{PACK_NAME}.nodes.comfy_glue")
    workbench = importlib.import_module(f"{PACK_NAME}.nodes.workbench")
    quants = importlib.import_module(f"{PACK_NAME}.lora_ops.ggml_quants")
    weights_module = importlib.import_module(f"{PACK_NAME}.lora_ops.model_weights")
    models = Path(comfy_dir) / "models" / "diffusion_models"
    torch.set_grad_enabled(False)

    def with_lora(model):
        entry, _, _ = glue.load_lora_entry(model, TINY["lora"], 1.0)
        return glue.with_lora_stack(model, glue.get_lora_stack(model).with_lora(entry))

    def step_seconds(model) -> float:
        sample(model)  # warm-up: loads the model
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            sample(model)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    float_model = with_lora(glue.load_diffusion_model(str(models / TINY["dev_f32"])))
    merged = glue.AppliedWeights(float_model)
    matrices = [n for n in merged.names() if len(merged.shape(n)) == 2]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.types.split(","):
            path = os.path.join(folder, f"baked-{name}.gguf")
            started = time.perf_counter()
            workbench.bake(float_model, path, quants.target_type(name), overwrite=False)
            bake_seconds = time.perf_counter() - started
            baked = weights_module.open_weights(path)
            errors = [float(torch.linalg.norm(baked.tensor(n) - merged.tensor(n)) / torch.linalg.norm(merged.tensor(n)))
                      for n in matrices]
            row = {"type": name, "MiB": os.path.getsize(path) / 2**20, "bake_s": bake_seconds,
                   "mean_rel_error": statistics.mean(errors), "max_rel_error": max(errors)}
            base_name = TINY["dev_gguf"].get(name)
            if base_name is not None:
                row["step_s_baked"] = step_seconds(glue.load_flux_gguf(path, "auto", "off"))
                row["step_s_runtime_lora"] = step_seconds(with_lora(glue.load_flux_gguf(str(models / base_name),
                                                                                        "auto", "off")))
            del baked
            os.remove(path)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
