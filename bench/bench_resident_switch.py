"""Time of a resident-mode strength change: sync_resident_layers alone (what the LoRA wrapper runs
before the first model call of a new stack), tiny FLUX from the harness, CPU, ComfyUI as a library.

    COMFYUI_PATH=$PWD/.harness/ComfyUI .harness/venv/bin/python bench/bench_resident_switch.py Q8_0 Q4_K

``PACK=<another checkout>`` times that checkout's code (the README's "before" column: d6eca5f)."""
import importlib.util
import os
import sys
import time

PACK = os.environ.get("PACK", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [PACK + "/tests", PACK]
import conftest  # ComfyUI as a library, in CPU mode (importing it does that)

spec = importlib.util.spec_from_file_location("comfyui_flux_qlora", PACK + "/__init__.py",
                                              submodule_search_locations=[PACK])
mod = importlib.util.module_from_spec(spec)
sys.modules["comfyui_flux_qlora"] = mod
spec.loader.exec_module(mod)
import torch
from comfyui_flux_qlora.lora_ops import qlinear
from comfyui_flux_qlora.nodes import comfy_glue as glue
from comfyui_flux_qlora.nodes.comfy_glue import quantized
from fluxq_testing import TINY, tiny_gguf_path

rebuilt = [0]
original = qlinear.folded_weight


def counting(*a, **k):
    rebuilt[0] += 1
    return original(*a, **k)


qlinear.folded_weight = counting
models = conftest.COMFY_DIR / "models"
for q in sys.argv[1:] or ["Q8_0"]:
    model = glue.load_flux_gguf(str(tiny_gguf_path(models, q)), resident="on")
    entry, _, _ = glue.load_lora_entry(model, TINY["lora"], 1.0)
    x = torch.randn(1, 16, 32, 32)
    stack = glue.LoraStack([entry])
    for label, s in (("first build", stack), ("strength 1.0 -> 0.5", stack.with_strength(entry.name, 0.5)),
                     ("strength 0.5 -> 0", stack.with_strength(entry.name, 0.0)),
                     ("removed", stack.without(entry.name))):
        rebuilt[0] = 0
        t = time.perf_counter()
        with torch.inference_mode():
            quantized.sync_resident_layers(model.model, s, x)
        print(f"{q} {label}: {time.perf_counter() - t:.2f} s, {rebuilt[0]} layers rebuilt", flush=True)
    # One model call at 256x256 (a sampling step at cfg 1) with the LoRA stack, for scale.
    half = glue.with_lora_stack(model, stack.with_strength(entry.name, 0.5))
    g = torch.Generator().manual_seed(0)
    cond, pooled = torch.randn(1, 256, 768, generator=g), torch.randn(1, 768, generator=g)
    options = {**half.model_options["transformer_options"], "wrappers": half.wrappers}
    for _ in range(2):
        t = time.perf_counter()
        with torch.inference_mode():
            half.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond, y=pooled, guidance=torch.tensor([3.5]),
                                   transformer_options=options)
        print(f"{q} one model call (step) at 256x256, resident on: {time.perf_counter() - t:.2f} s", flush=True)
