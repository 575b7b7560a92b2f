"""FluxQ GGUF + runtime LoRA against ComfyUI native, measured in one process, one run.

Every figure is reported next to its ratio against ComfyUI native measured in the same run
(GGUF timings moved 5-10 % between runs in docs' anchors: only compare inside one run).

Configurations (same random weights for all):
  native            core ``comfy.sd.load_diffusion_model_state_dict`` on the float weights
  native + LoRA     core ``comfy.sd.load_lora_for_models`` (core merges the LoRA into the weights)
  FluxQ Q8_0 / Q4_0 GGUF written with ``lora_ops.gguf_write.write_gguf`` (``flux_qtype_for``),
                    loaded with ``nodes.comfy_glue.load_flux_gguf``
  FluxQ + LoRA      ``load_lora_entry`` + ``with_lora_stack`` (runtime hooks, no weight touched)
  micro             per FLUX.1-dev linear shape and quant: native matmul, and each plan with the
                    eager and with the fused dequantization kernels (``--micro only``: nothing else)
The LoRA is kohya format, rank 32, alpha 32, on every 2-D weight of the double and single blocks
(304 linears at full size).

Measures (see bench/README.md):
  s/step   gaps between sampler callbacks (``comfy.sample.sample``, euler/simple, cfg 1,
           guidance 3.5) with a device sync in the callback; median after the warm-up gaps
           (the first gap also holds the model load).
  peak     CUDA: ``torch.cuda.max_memory_allocated`` over the timed sampling, reset before it
           (includes the resident weights; all models are unloaded before each config).
           CPU: there is no allocator peak, so the resident model size
           ``ModelPatcher.model_size()`` is reported instead (labelled as such).
  switch   core (native + LoRA): ``comfy.model_management.load_models_gpu`` of the LoRA clone while
           the base is loaded ("in"), then of the base again ("out") - ComfyUI re-merges weights.
           ours: time to produce the model at strength 0.5 (``with_strength`` + ``with_lora_stack``)
           plus its first sampled step, and the same for removal (``without``). A one-step sample
           of the unchanged LoRA model is timed just before as the control: switch first step minus
           control = weight work done by the switch (should be ~0).

--arch picks the family member (FLUX.1 [dev] by default; FLUX.2 [dev], klein 4B / 9B: their
architectures from the family registry; bench/README.md says what each needs on a GPU).

Run on this machine (CPU, tiny depth-1/1 model: a plumbing check):
    .harness/venv/bin/python bench/bench_flux_gguf.py --size tiny --res 256 --warmup 1 --steps 5

Run on the lent GPU machine (``run`` tool; see /work/.library/device/README.md), full FLUX.1-dev
architecture (19 double + 38 single blocks, 11.9B params, random bf16 N(0, 0.02) built on the GPU),
1024x1024, context 1x512x4096, pooled 768. The GPU machine has torch but lacks ComfyUI, ``gguf``,
``torchsde`` (+ ``trampoline``); ``av`` is missing too, which is why this script never imports
ComfyUI's top-level ``nodes`` nor the pack's ``__init__`` (``comfy_api.latest`` imports ``av``):
it imports ``nodes/comfy_glue/`` under stub parent packages. Prepare once, in the repo root here:
    echo /.comfy/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
    mkdir -p .comfy && tar -C .harness/ComfyUI --exclude=./models --exclude=./output --exclude=./input \\
          --exclude=./user --exclude='./tests*' --exclude=__pycache__ -cf - . | tar -C .comfy -xf -
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
          --platform manylinux2014_x86_64 -d .whl gguf==0.19.0 torchsde==0.2.6 trampoline==0.1.2
    (the versions in .harness/venv; all three are pure-python wheels)
then call ``run`` with carry [".comfy", ".whl"] and the command
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && \\
      python3 bench/bench_flux_gguf.py --size full --comfyui .comfy --work-dir /tmp/fluxq-bench \\
      --fused auto,off --json-out $OUT/full.json
(--fused auto,off: the streaming rows with the fused dequantization kernels and with the separate
eager ones; see lora_ops/fused_dequant.py)
(call ``run`` with timeout_s 600). Files written into the checkout on the device machine do not
come back: only $OUT does, so pass --json-out $OUT/...; copy it here to bench/results/ afterwards.
The JSON is rewritten after every config, so a call killed at the 10-minute limit still returns
what it measured. The GGUF files (12.7 GB Q8_0, 6.8 GB Q4_0, quantized in numpy by write_gguf, two
threads) go to --work-dir (/tmp on that machine, never the checkout). If one call does not fit,
split it: ``--quants Q8_0`` then ``--quants Q4_0`` (native is measured in each call, so the ratios
stay within one run); ``--reuse`` keeps GGUF/LoRA files of the same seed already in --work-dir
for a later call on the still-warm machine.
PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync is set before torch is imported, as ComfyUI's
main.py does (cuda_malloc).

Writes a markdown table to stdout and JSON to bench/results/<size>-<device>.json (atomically).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_flux_qlora"
LORA_NAME = "fluxq-bench-rank32.safetensors"
MAX_LORAS = 3
LORA_NAMES = [LORA_NAME] + [f"fluxq-bench-rank32-{i}.safetensors" for i in range(2, MAX_LORAS + 1)]
LORA_RANK = 32

SIZES = ("full", "tiny")
# Family members the benchmark builds (ComfyUI's Flux class): the registry gives their
# architectures. full: the released sizes; tiny: the tests' models (FLUX.1 3072 wide with one block
# of each kind, FLUX.2 128 wide, which only ComfyUI 0.33+ builds).
ARCHS = ("flux1-dev", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b")
GUIDANCE_BY_VERSION = {"flux1": 3.5, "flux2": 4.0}  # the flux-dev / flux2-dev presets


def arch_params(arch: str, size: str) -> dict:
    flux_family = importlib.import_module(PACK_NAME + ".lora_ops.flux_family")
    member = flux_family.BY_ID[arch]
    if size == "full":
        return member.full_params()
    tiny = member.tiny or {**flux_family.BY_ID["flux2-klein-4b"].tiny}  # klein 9B: the klein tiny model
    return dict(tiny)
# tiny: 77 context tokens (CLIP-L-shaped, as the tests use): 512 would make a CPU step ~3x longer.
DEFAULTS = {"full": dict(res=1024, warmup=3, steps=5, txt_tokens=512, micro_token_divisor=1),
            "tiny": dict(res=256, warmup=1, steps=3, txt_tokens=77, micro_token_divisor=64)}

# FLUX.1-dev linear shapes at 1024x1024 (tokens M, out N, in K) and how many a step runs
# (../shared/ANCHORS.md: image stream 4096 tokens, text 512, single blocks 4608, modulations 1).
FLUX_LINEARS = {
    "img qkv": (4096, 9216, 3072, 19), "img attn proj": (4096, 3072, 3072, 19), "img mlp.0": (4096, 12288, 3072, 19), "img mlp.2": (4096, 3072, 12288, 19),
    "single linear1": (4608, 21504, 3072, 38), "single linear2": (4608, 3072, 15360, 38),
    "double mod": (1, 18432, 3072, 38), "single mod": (1, 9216, 3072, 38), "txt mlp.0": (512, 12288, 3072, 19),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=SIZES, required=True)
    p.add_argument("--arch", choices=ARCHS, default="flux1-dev",
                   help="family member (FLUX.2 at full size: dev 32B needs ~64 GB for native bf16 alone; "
                        "klein needs ComfyUI 0.33+)")
    p.add_argument("--res", type=int, help="image side in pixels (full: 1024, tiny: 256)")
    p.add_argument("--warmup", type=int, help="callback gaps dropped before the median (full: 3, tiny: 1)")
    p.add_argument("--steps", type=int, help="timed steps after the warm-up (full: 5, tiny: 3)")
    p.add_argument("--txt-tokens", type=int, help="context tokens (full: 512, tiny: 77)")
    p.add_argument("--quants", default="Q8_0,Q4_K,Q4_0", help="GGUF types to measure, comma-separated")
    p.add_argument("--resident", default="off,on", help="FluxQLoadGGUF resident modes to measure (off, auto, on)")
    p.add_argument("--loras", default="0,1,3", help="numbers of stacked rank-32 LoRAs to measure per quant and mode")
    p.add_argument("--compile", choices=("on", "off"), default="on",
                   help="also measure native and the first quant (resident off, 0 and 1 LoRA) under core's "
                        "torch.compile helper (TorchCompileModel's body, inductor)")
    p.add_argument("--micro", choices=("on", "off", "only"), default="on",
                   help="per-layer micro-benchmark of each plan on the FLUX.1-dev linear shapes (bench/README.md); "
                        "only: nothing else (no model, no GGUF written)")
    p.add_argument("--fused", default="auto",
                   help="FLUXQ_FUSED_DEQUANT modes (auto, on, off) to measure the streaming (resident=off) FluxQ "
                        "rows under, comma-separated; auto fuses on CUDA only (e.g. auto,off on a GPU: fused "
                        "against unfused eager kernels)")
    p.add_argument("--micro-token-divisor", type=int,
                   help="divide the shapes' token counts by this (full: 1; tiny: 64, the CPU cannot do 4096 tokens)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".harness" / "ComfyUI"))
    p.add_argument("--work-dir", type=Path, help="where the GGUF and LoRA files go and stay (default: a temp dir, removed at the end)")
    p.add_argument("--reuse", action="store_true", help="reuse GGUF/LoRA files already in --work-dir (same seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, help="also write the JSON here (e.g. $OUT/full.json on the device)")
    args = p.parse_args()
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    args.resident = [m.strip() for m in args.resident.split(",") if m.strip()]
    args.loras = sorted({int(n) for n in args.loras.split(",") if n.strip()})
    if max(args.loras, default=0) > MAX_LORAS:
        p.error(f"--loras: at most {MAX_LORAS} stacked LoRAs")
    args.fused = [m.strip() for m in args.fused.split(",") if m.strip()]
    if not args.fused or any(m not in ("auto", "on", "off") for m in args.fused):
        p.error(f"--fused: modes among auto, on, off, got {args.fused}")
    return args


def setup_comfy(args):
    """ComfyUI as a library (comfy.* only: no ``nodes``, no ``comfy_api``), then our comfy_glue."""
    want_cuda = args.device == "cuda"
    if args.device == "auto":
        import torch

        want_cuda = torch.cuda.is_available()
    if not (args.comfyui / "comfy").is_dir():
        sys.exit(f"no ComfyUI code at {args.comfyui} (--comfyui)")
    sys.path.insert(0, str(args.comfyui))
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    argv, sys.argv = sys.argv, [sys.argv[0]] + ([] if want_cuda else ["--cpu"])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses the argv above)

    sys.argv = argv
    # Stub parent packages: the pack's __init__ imports comfy_api.latest (needs av) and
    # nodes/__init__ imports every node module; comfy_glue itself needs only comfy + folder_paths.
    for name, path in ((PACK_NAME, REPO_ROOT), (PACK_NAME + ".nodes", REPO_ROOT / "nodes")):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            sys.modules[name] = module
    return importlib.import_module(PACK_NAME + ".nodes.comfy_glue"), want_cuda


# --- weights and files ---------------------------------------------------------------------


def random_flux_state_dict(params: dict, device, seed: int):
    """Every tensor N(0, 0.02) in bf16, built on `device` (shapes from ComfyUI's Flux on meta)."""
    import comfy.ldm.flux.model
    import comfy.ops
    import torch

    from make_tiny_models import model_params

    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init,
                                          **model_params(comfy.ldm.flux.model.FluxParams, params))
    g = torch.Generator(device=device).manual_seed(seed)
    return {
        name: (torch.randn(t.shape, generator=g, device=device, dtype=torch.bfloat16) * 0.02)
        for name, t in model.state_dict().items()
    }


def block_linears(sd) -> list[str]:
    return [n for n, t in sd.items() if t.ndim == 2 and n.startswith(("double_blocks.", "single_blocks."))]


def write_kohya_lora(path: Path, sd, seed: int) -> int:
    """Rank-32 kohya LoRA (alpha 32) on every block linear, bf16; returns its parameter count."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed + 1)
    out, n = {}, 0
    for name in block_linears(sd):
        rows, cols = sd[name].shape
        prefix = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        out[prefix + ".lora_down.weight"] = (torch.randn(LORA_RANK, cols, generator=g) / cols**0.5).bfloat16()
        out[prefix + ".lora_up.weight"] = (torch.randn(rows, LORA_RANK, generator=g) * 0.02 / LORA_RANK**0.5).bfloat16()
        out[prefix + ".alpha"] = torch.tensor(float(LORA_RANK))
        n += LORA_RANK * (rows + cols)
    tmp = path.with_name(path.name + ".partial")
    save_file(out, str(tmp))
    os.replace(tmp, path)
    return n


class _LazyNumpy:
    """A mapping for write_gguf whose items() hand over one float32 numpy array at a time
    (a full-size float32 copy of the model would be 48 GB of host memory)."""

    def __init__(self, sd):
        self.sd = sd

    def items(self):
        import torch

        for name, t in self.sd.items():
            yield name, t.to(torch.float32).cpu().numpy()


# --- measuring -----------------------------------------------------------------------------


class Timer:
    def __init__(self, cuda: bool):
        import torch

        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def conditioning(params: dict, txt_tokens: int, seed: int, guidance: float):
    """Random text conditioning of the model's context width; a CLIP pooled vector (FLUX.1) and the
    distilled guidance (dev) only where the model has those inputs."""
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    extra = {}
    if params.get("vec_in_dim"):
        extra["pooled_output"] = torch.randn(1, params["vec_in_dim"], generator=g)
    if params.get("guidance_embed"):
        extra["guidance"] = guidance
    return [[torch.randn(1, txt_tokens, params["context_in_dim"], generator=g), extra]]


def sample_gaps(model, steps: int, latent_shape, positive, timer: Timer, seed: int) -> list[float]:
    """ComfyUI's sampler; returns the gaps between step callbacks (the first one holds the load)."""
    import comfy.sample
    import torch

    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    stamps = [timer.now()]

    def callback(step, x0, x, total_steps):
        stamps.append(timer.now())

    comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
                        callback=callback, disable_pbar=True, seed=seed)
    if len(stamps) != steps + 1:
        raise RuntimeError(f"expected {steps} callbacks, got {len(stamps) - 1}")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def fresh_device(cuda: bool) -> None:
    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    gc.collect()
    mm.cleanup_models_gc()
    mm.soft_empty_cache(force=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def measure(label: str, model, ctx) -> dict:
    """One config: s/step (median after warm-up) and peak memory (CUDA) or resident size (CPU)."""
    import torch

    fresh_device(ctx.cuda)
    gaps = sample_gaps(model, ctx.warmup + ctx.steps, ctx.latent_shape, ctx.positive, ctx.timer, ctx.seed)
    timed = gaps[ctx.warmup:]
    resident = [m.resident for m in model.model.diffusion_model.modules() if getattr(m, "resident", None) is not None]
    row = {
        "config": label,
        "s_per_step": statistics.median(timed),
        "gaps_s": gaps,
        "model_size_gb": model.model_size() / 1e9,
        # dequantized copies kept by resident mode (not in model_size: ComfyUI does not count them)
        "resident_gb": sum(r.nbytes for r in resident) / 1e9,
        "resident_layers": len(resident),
    }
    row["memory_gb"] = (torch.cuda.max_memory_allocated() / 1e9 if ctx.cuda
                        else row["model_size_gb"] + row["resident_gb"])
    print(f"[bench] {label}: {row['s_per_step']:.3f} s/step, {row['memory_gb']:.2f} GB "
          f"({'peak' if ctx.cuda else 'model_size'}); gaps {['%.3f' % g for g in gaps]}", flush=True)
    return row


def core_switch(base, lora_model, timer: Timer) -> dict:
    """The reference definition: load_models_gpu of the LoRA clone while the base is loaded, then the base."""
    import comfy.model_management as mm

    mm.load_models_gpu([base])
    t0 = timer.now()
    mm.load_models_gpu([lora_model])
    t1 = timer.now()
    mm.load_models_gpu([base])
    t2 = timer.now()
    return {"switch_in_s": t1 - t0, "switch_out_s": t2 - t1}


def first_step(model, ctx) -> float:
    return sample_gaps(model, 1, ctx.latent_shape, ctx.positive, ctx.timer, ctx.seed)[0]


def ours_switch(glue, lora_model, ctx) -> dict:
    """Strength change and removal: produce the model, then its first step (no weight work expected)."""
    control = first_step(lora_model, ctx)  # one-step sample of the unchanged, loaded LoRA model

    t0 = ctx.timer.now()
    stack = glue.get_lora_stack(lora_model).with_strength(LORA_NAME, 0.5)
    half = glue.with_lora_stack(lora_model, stack)
    produce_strength = ctx.timer.now() - t0
    step_strength = first_step(half, ctx)

    t0 = ctx.timer.now()
    removed = glue.with_lora_stack(half, glue.get_lora_stack(half).without(LORA_NAME))
    produce_remove = ctx.timer.now() - t0
    step_remove = first_step(removed, ctx)
    return {
        "control_first_step_s": control,
        "strength_produce_s": produce_strength,
        "strength_first_step_s": step_strength,
        "strength_total_s": produce_strength + step_strength,
        "strength_excess_s": produce_strength + step_strength - control,
        "remove_produce_s": produce_remove,
        "remove_first_step_s": step_remove,
        "remove_total_s": produce_remove + step_remove,
        "remove_excess_s": produce_remove + step_remove - control,
    }


def compiled(model, cuda):
    """A clone under core's torch.compile helper (the body of TorchCompileModel), inductor."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    clone = model.clone()
    set_torch_compile_wrapper(clone, backend="inductor")
    return clone


def measure_compiled(label: str, model, ctx) -> dict:
    """As ``measure``; the first gap holds the compile: compile_s = first gap - median step."""
    import torch._dynamo

    torch._dynamo.reset()
    row = measure(label, model, ctx)
    row["compile_s"] = row["gaps_s"][0] - row["s_per_step"]
    return row


def micro_benchmark(args, cuda: bool, timer: Timer) -> list[dict]:
    """Per-layer: the native float matmul against each plan of lora_ops.qlinear, FLUX.1-dev shapes.

    Weights random N(0, 0.02) quantized by gguf_write.encode; on CUDA a 256 MB buffer is written
    between repetitions (L2 flushed) and the compute dtype is bf16, on the CPU fp32. Plans: dequant
    (dequantize into one compute-dtype weight, then F.linear), dequant+fold (one rank-32 LoRA
    folded into that weight), gemv (one-token layers only), and the separate rank-32 low-rank path
    beside the native matmul (what folding replaces). The resident plan is the native row by
    construction (the same F.linear on a kept weight).

    Each quant's weight, dequant and gemv rows are measured twice: with the eager kernels
    (FLUXQ_FUSED_DEQUANT=off) and with the fused kernel (=on, also on the CPU); ``weight`` is the
    dequantization alone (bytes to compute-dtype weight), and ``first_ms`` the untimed first call
    (for fused rows: the kernel's compile, once per shape, type and dtype)."""
    import numpy as np
    import torch

    qlinear = importlib.import_module(PACK_NAME + ".lora_ops.qlinear")
    runtime = importlib.import_module(PACK_NAME + ".lora_ops.lora_runtime")
    gguf_write = importlib.import_module(PACK_NAME + ".lora_ops.gguf_write")
    fused = importlib.import_module(PACK_NAME + ".lora_ops.fused_dequant")
    from gguf import GGMLQuantizationType

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    reps = 10 if cuda else 2
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if cuda else None

    first = {}

    def timed(fn) -> float:
        t0 = timer.now()
        fn()
        first["ms"] = (timer.now() - t0) * 1e3
        times = []
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            t0 = timer.now()
            fn()
            times.append(timer.now() - t0)
        return statistics.median(times) * 1e3

    rows = []
    rng = np.random.default_rng(args.seed)
    previous_mode = os.environ.get(fused.MODE_ENV)
    for shape_name, (m, n, k, per_step) in FLUX_LINEARS.items():
        m = max(1, m // args.micro_token_divisor) if m > 1 else 1
        weight = (rng.standard_normal((n, k), dtype=np.float32) * 0.02)
        x = torch.randn(1, m, k, device=device, dtype=dtype)
        native_w = torch.from_numpy(weight).to(device, dtype)
        native_ms = timed(lambda: torch.nn.functional.linear(x, native_w))
        adapter = runtime.LowRankAdapter(torch.randn(LORA_RANK, k) / k ** 0.5, torch.randn(n, LORA_RANK) * 0.02, 1.0)
        pairs = ((torch.tensor(1.0), adapter),)
        separate_ms = timed(lambda: runtime.add_updates(torch.nn.functional.linear(x, native_w), x, pairs))
        rows.append({"shape": shape_name, "M": m, "N": n, "K": k, "per_step": per_step, "quant": "-",
                     "plan": "native", "ms": native_ms})
        rows.append({"shape": shape_name, "M": m, "N": n, "K": k, "per_step": per_step, "quant": "-",
                     "plan": "native + separate LoRA", "ms": separate_ms})
        for q in args.quants:
            qtype = GGMLQuantizationType[q]
            raw = torch.from_numpy(gguf_write.encode(weight, qtype, rng).reshape(-1).view(np.uint8).copy())
            data, layout = qlinear.repack(raw, qtype)
            data = data.to(device)
            plans = {
                "weight": lambda: qlinear.dequantize_weight(data, qtype, (n, k), layout, dtype),
                "dequant": lambda: torch.nn.functional.linear(
                    x, qlinear.folded_weight(data, qtype, (n, k), layout, (), dtype)),
                "dequant + fold 1 LoRA": lambda: torch.nn.functional.linear(
                    x, qlinear.folded_weight(data, qtype, (n, k), layout, pairs, dtype)),
            }
            if m == 1:
                plans["gemv"] = lambda: qlinear.gemv(x, data, qtype, (n, k), layout)
            for kernels, mode in (("eager", "off"), ("fused", "on")):
                os.environ[fused.MODE_ENV] = mode
                for plan, fn in plans.items():
                    ms = timed(fn)
                    rows.append({"shape": shape_name, "M": m, "N": n, "K": k, "per_step": per_step, "quant": q,
                                 "plan": f"{plan} ({kernels})", "kernels": kernels, "ms": ms,
                                 "first_ms": first["ms"]})
            if fused.stats()["failed"]:
                raise RuntimeError(f"fused kernels failed to build, the fused rows would be eager: {fused.stats()['failed']}")
        for r in rows:
            if r["shape"] == shape_name:
                r["x_native"] = r["ms"] / native_ms
        print(f"[bench] micro {shape_name} (M {m}): " + ", ".join(
            f"{r['quant']} {r['plan']} {r['ms']:.2f} ms" for r in rows if r["shape"] == shape_name), flush=True)
        del native_w, data, raw
    if previous_mode is None:
        os.environ.pop(fused.MODE_ENV, None)
    else:
        os.environ[fused.MODE_ENV] = previous_mode
    return rows


# --- report ----------------------------------------------------------------------------------


def markdown_table(result: dict) -> str:
    rows = result["rows"]
    native = rows[0] if rows else None
    mem_head = "peak GB" if result["meta"]["memory_metric"] == "cuda_max_memory_allocated" else "held GB (model_size + resident copies)"
    lines = [
        f"| config | s/step | x native | LoRA step cost | {mem_head} | x native | LoRA switch |",
        "|---|---|---|---|---|---|---|",
    ] if rows else []
    for r in rows:
        if "switch_in_s" in r:
            switch = f"core load_models_gpu: in {r['switch_in_s']:.2f} s / out {r['switch_out_s']:.2f} s"
        elif "strength_total_s" in r:
            switch = (f"strength {r['strength_total_s']:.2f} s (produce {r['strength_produce_s'] * 1e3:.1f} ms) / "
                      f"remove {r['remove_total_s']:.2f} s; control step {r['control_first_step_s']:.2f} s")
        else:
            switch = "-"
        if "compile_s" in r:
            switch += f"; compile {r['compile_s']:.1f} s"
        lines.append(
            f"| {r['config']} | {r['s_per_step']:.3f} | {r['s_per_step'] / native['s_per_step']:.2f} | "
            f"{'%+.1f %%' % (100 * r['lora_step_cost']) if 'lora_step_cost' in r else '-'} | "
            f"{r['memory_gb']:.2f} | {r['memory_gb'] / native['memory_gb']:.2f} | {switch} |"
        )
    if result.get("micro"):
        lines += ["", "| layer (M, N, K) | quant | plan | ms | x native | first call ms |", "|---|---|---|---|---|---|"]
        for r in result["micro"]:
            lines.append(f"| {r['shape']} ({r['M']}, {r['N']}, {r['K']}) | {r['quant']} | {r['plan']} | "
                         f"{r['ms']:.3f} | {r['x_native']:.2f} | {r.get('first_ms', float('nan')):.0f} |")
    return "\n".join(lines)


def atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_name(args) -> str:
    """FLUX.1 keeps the names of the earlier results (full-<gpu>.json); other members are prefixed."""
    return args.size if args.arch == "flux1-dev" else f"{args.arch}-{args.size}"


def device_slug(cuda: bool) -> str:
    import torch

    if not cuda:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main() -> int:
    args = parse_args()
    if args.work_dir is not None:
        return run(args)
    # No --work-dir: the GGUF/LoRA files (GBs) go to a temp dir that is removed afterwards.
    with tempfile.TemporaryDirectory(prefix="fluxq-bench-") as tmp:
        args.work_dir = Path(tmp)
        return run(args)


def run(args) -> int:
    if args.device != "cpu":
        # What ComfyUI's main.py does (cuda_malloc.py) before torch is imported.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    glue, cuda = setup_comfy(args)
    if args.size == "full" and not cuda:
        sys.exit("--size full needs a CUDA GPU (FLUX.1-dev 11.9B params, FLUX.2 [dev] 32B); use --size tiny on CPU")
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import folder_paths
    import torch
    from gguf import GGMLQuantizationType

    gguf_write = importlib.import_module(PACK_NAME + ".lora_ops.gguf_write")
    device = mm.get_torch_device()
    params = arch_params(args.arch, args.size)
    flux_family = importlib.import_module(PACK_NAME + ".lora_ops.flux_family")
    member = flux_family.BY_ID[args.arch]
    guidance = GUIDANCE_BY_VERSION[member.base_model_version]
    work_dir = args.work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "loras").mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(work_dir / "loras"))

    ctx = types.SimpleNamespace(
        cuda=cuda, warmup=args.warmup, steps=args.steps, seed=args.seed, timer=Timer(cuda),
        latent_shape=(1, member.latent_channels, args.res // member.latent_downscale,
                      args.res // member.latent_downscale),
        positive=conditioning(params, args.txt_tokens, args.seed, guidance),
    )
    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "arch": args.arch, "size": args.size, "res": args.res, "txt_tokens": args.txt_tokens, "warmup_gaps": args.warmup,
        "timed_steps": args.steps, "seed": args.seed,
        "sampler": "euler/simple, cfg 1.0" + (f", guidance {guidance:g}" if member.guidance else ""),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                             f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(),
        "memory_metric": "cuda_max_memory_allocated" if cuda else
                         "model_size + resident copies (CPU: bytes the model holds, not a peak)",
        "lora": f"kohya rank {LORA_RANK} alpha {LORA_RANK}, all block linears",
        "fused_dequant_modes": args.fused,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import comfyui_version

        meta["comfyui"] = comfyui_version.__version__
    except ImportError:
        pass

    if args.micro == "only":
        return report(args, cuda, meta, [], micro_benchmark(args, cuda, ctx.timer))

    t0 = time.perf_counter()
    sd = random_flux_state_dict(params, device, args.seed)
    meta["params"] = sum(t.numel() for t in sd.values())
    meta["lora_layers"] = len(block_linears(sd))
    print(f"[bench] {args.arch} {args.size}: {meta['params'] / 1e9:.2f}B params on {device} in {time.perf_counter() - t0:.1f} s", flush=True)

    meta["lora_params"] = sum(LORA_RANK * sum(sd[n].shape) for n in block_linears(sd))
    lora_path = work_dir / "loras" / LORA_NAME
    for i, name in enumerate(LORA_NAMES[:max(1, max(args.loras, default=0))]):
        if not (args.reuse and (work_dir / "loras" / name).exists()):
            write_kohya_lora(work_dir / "loras" / name, sd, args.seed + 10 * i)

    # GGUFs from the same weights, written in parallel threads (numpy quantization releases the GIL).
    gguf_paths = {q: work_dir / f"fluxq-bench-{run_name(args)}-s{args.seed}-{q}.gguf" for q in args.quants}

    def write(q):
        path = gguf_paths[q]
        if args.reuse and path.exists():
            return 0.0
        start = time.perf_counter()
        gguf_write.write_gguf(path, _LazyNumpy(sd), gguf_write.flux_qtype_for(GGMLQuantizationType[q]))
        return time.perf_counter() - start

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(args.quants))) as pool:
        write_s = dict(zip(args.quants, pool.map(write, args.quants)))
    meta["gguf"] = {q: {"bytes": gguf_paths[q].stat().st_size, "write_s": write_s[q]} for q in args.quants}
    print(f"[bench] GGUF written in {time.perf_counter() - t0:.1f} s: {meta['gguf']}", flush=True)

    native = comfy.sd.load_diffusion_model_state_dict(dict(sd))
    del sd
    gc.collect()
    mm.soft_empty_cache(force=True)

    rows = []

    def save_partial():
        # A call killed at the device's time limit still leaves the rows measured so far.
        if args.json_out:
            atomic_write_json(args.json_out, {"meta": meta, "rows": rows, "partial": True})

    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        rows.append(measure("ComfyUI native", native, ctx))
        save_partial()
        lora_sd = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
        native_lora, _ = comfy.sd.load_lora_for_models(native, None, lora_sd, 1.0, 0.0)
        del lora_sd
        row = measure("native + LoRA (core merge)", native_lora, ctx)
        row.update(core_switch(native, native_lora, ctx.timer))
        rows.append(row)
        save_partial()
        del native_lora
        fresh_device(cuda)

        for q in args.quants:
            for mode in args.resident:
                base = glue.load_flux_gguf(str(gguf_paths[q]), resident=mode)
                entries = []
                for name in LORA_NAMES[:max(args.loras, default=0)]:
                    entry, _, lora_report = glue.load_lora_entry(base, name, 1.0)
                    meta.setdefault("lora_report", lora_report)
                    entries.append(entry)
                # Streaming dequantizes every step: measured under each FLUXQ_FUSED_DEQUANT mode asked
                # for; a resident copy is built once, so its rows run under the first mode only.
                for fused in args.fused if mode == "off" else args.fused[:1]:
                    os.environ["FLUXQ_FUSED_DEQUANT"] = fused
                    for n in args.loras:
                        model = glue.with_lora_stack(base, glue.LoraStack(entries[:n])) if n else base
                        label = (f"FluxQ {q} resident={mode}" + (f", dequant {fused}" if len(args.fused) > 1 else "")
                                 + (f" + {n} LoRA" if n else ""))
                        row = measure(label, model, ctx)
                        row.update(quant=q, resident=mode, loras=n, fused=fused)
                        if n == 1:
                            row.update(ours_switch(glue, model, ctx))
                        rows.append(row)
                        save_partial()
                        del model
                os.environ["FLUXQ_FUSED_DEQUANT"] = args.fused[0]
                del base, entries
                fresh_device(cuda)

        if args.compile == "on":
            rows.append(measure_compiled("ComfyUI native, compiled", compiled(native, cuda), ctx))
            save_partial()
            q = args.quants[0]
            base = glue.load_flux_gguf(str(gguf_paths[q]), resident="off")
            entry, _, _ = glue.load_lora_entry(base, LORA_NAME, 1.0)
            compiled_base = compiled(base, cuda)
            rows.append(measure_compiled(f"FluxQ {q} resident=off, compiled", compiled_base, ctx))
            rows[-1].update(quant=q, resident="off", loras=0)
            save_partial()
            lora_model = glue.with_lora_stack(compiled_base, glue.LoraStack([entry]))
            row = measure_compiled(f"FluxQ {q} resident=off, compiled + 1 LoRA", lora_model, ctx)
            row.update(quant=q, resident="off", loras=1)
            row.update(ours_switch(glue, lora_model, ctx))  # a recompile would show in the first steps
            rows.append(row)
            save_partial()
            del base, entry, compiled_base, lora_model
            fresh_device(cuda)

    return report(args, cuda, meta, rows, micro_benchmark(args, cuda, ctx.timer) if args.micro == "on" else [])


def report(args, cuda: bool, meta: dict, rows: list[dict], result_micro: list[dict]) -> int:
    native_compiled = next((r for r in rows if r["config"] == "ComfyUI native, compiled"), None)
    for r in rows:
        r["x_native_step"] = r["s_per_step"] / rows[0]["s_per_step"]
        r["x_native_memory"] = r["memory_gb"] / rows[0]["memory_gb"]
        if "compile_s" in r and native_compiled is not None:
            r["x_native_compiled_step"] = r["s_per_step"] / native_compiled["s_per_step"]
        if r.get("loras"):  # against the same quant, mode, kernels and compile setting without LoRA
            base_row = next(b for b in rows if b.get("loras") == 0 and b.get("quant") == r["quant"]
                            and b.get("resident") == r["resident"] and b.get("fused") == r.get("fused")
                            and ("compile_s" in b) == ("compile_s" in r))
            r["lora_step_cost"] = r["s_per_step"] / base_row["s_per_step"] - 1.0
    if rows:
        rows[1]["lora_step_cost"] = rows[1]["s_per_step"] / rows[0]["s_per_step"] - 1.0  # native + LoRA (core merge)
    result = {"meta": meta, "rows": rows, "micro": result_micro}
    table = markdown_table(result)
    result["table_markdown"] = table
    # A micro-only run gets a file of its own: it must not replace a full run's results.
    suffix = "-micro" if args.micro == "only" else ""
    out = REPO_ROOT / "bench" / "results" / f"{run_name(args)}-{device_slug(cuda)}{suffix}.json"
    atomic_write_json(out, result)
    if args.json_out:
        atomic_write_json(args.json_out, result)
    print()
    print(table)
    print(f"\n[bench] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
