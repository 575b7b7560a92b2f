"""Helpers for the in-process oracle tests (ComfyUI as a library; see tests/conftest.py)."""

from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
import torch

TINY_LATENT = (1, 16, 8, 8)  # 64x64 pixels

# The harness's tiny models (scripts/make_tiny_models.py).
TINY = {
    "dev_f32": "fluxq-tiny-dev.safetensors",
    "dev_gguf": {q: f"fluxq-tiny-dev-{q}.gguf" for q in ("F16", "Q8_0", "Q4_K")},
    "schnell_gguf": "fluxq-tiny-schnell-Q8_0.gguf",
    "clip_l": "fluxq-tiny-clip_l.safetensors",
    "vae": "fluxq-tiny-ae.safetensors",
    "lora": "fluxq-tiny-lora.safetensors",
    "lora_b": "fluxq-tiny-lora-b.safetensors",
}



def node_class_for_prompt(node_class, unique_id: str):
    """The class clone ComfyUI's executor makes to run a V3 node, with its hidden inputs set.

    ComfyUI 0.3.75's ``PREPARE_CLASS_CLONE`` takes the hidden inputs; 0.33 takes the executor's
    ``v3_data``, which holds them under "hidden_inputs"."""
    import inspect

    hidden = {"unique_id": unique_id}
    if "v3_data" in inspect.signature(node_class.PREPARE_CLASS_CLONE).parameters:
        return node_class.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    return node_class.PREPARE_CLASS_CLONE(hidden)


def flux_conditioning(seed: int = 0, guidance: float | None = 3.5):
    """A fixed random CLIP-L-shaped conditioning (77x768 tokens + 768 pooled) for the tiny FLUX."""
    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, 768, generator=g)}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(1, 77, 768, generator=g), extra]]


def sample(model, seed: int = 0, steps: int = 1, positive=None, latent_shape=TINY_LATENT) -> torch.Tensor:
    """ComfyUI's own sampler (what KSampler runs), euler/simple, cfg 1.

    One step by default: every step of the tiny model reads all its ~535M weights on CPU.
    """
    import comfy.sample

    positive = positive or flux_conditioning()
    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent, seed=seed)


def dequantized_state_dict(gguf_path) -> dict[str, torch.Tensor]:
    """The oracle: every tensor of a .gguf dequantized by the gguf package (numpy), as float32."""
    reader = gguf.GGUFReader(str(gguf_path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        out[t.name] = torch.from_numpy(np.ascontiguousarray(values).reshape(tuple(reversed([int(d) for d in t.shape]))))
    return out


def core_model(state_dict: dict[str, torch.Tensor]):
    """The same weights loaded the way core UNETLoader loads a .safetensors."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(state_dict))


# Loading and dequantizing a tiny model costs seconds on CPU: each is built once per session.
@functools.lru_cache(maxsize=None)
def tiny_gguf_model(models_dir: Path, qtype: str):
    from comfyui_flux_qlora.nodes.comfy_glue import load_flux_gguf

    return load_flux_gguf(str(tiny_gguf_path(models_dir, qtype)))


@functools.lru_cache(maxsize=1)  # each is ~2.1 GB of float32: keep one (CI has 24 GB)
def tiny_reference_model(models_dir: Path, qtype: str):
    """Core ComfyUI on the gguf package's own dequantization of the same file."""
    return core_model(dequantized_state_dict(tiny_gguf_path(models_dir, qtype)))


def tiny_gguf_path(models_dir: Path, qtype: str) -> Path:
    return models_dir / "diffusion_models" / f"fluxq-tiny-dev-{qtype}.gguf"


def load_latent(path: Path):
    """The tensor inside a SaveLatent file."""
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


def comfyui_version(server) -> tuple[int, ...]:
    """The (major, minor, patch) of the ComfyUI a real server runs, as its /system_stats says."""
    return tuple(int(p) for p in server.get("/system_stats")["system"]["comfyui_version"].split(".")[:3])


def comfyui_is_0_33() -> bool:
    """Whether the ComfyUI imported in this process (the in-process tests') is 0.33 or newer."""
    import comfyui_version

    return tuple(int(p) for p in comfyui_version.__version__.split(".")[:2]) >= (0, 33)


def expect_error(server, prompt, *fragments) -> str:
    """Runs ``prompt`` on the real server, expecting its execution_error to hold every fragment."""
    import pytest
    from comfy_server import ExecutionFailed

    with pytest.raises(ExecutionFailed) as failure:
        server.run(prompt)
    message = str(failure.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def saved_latent(server, history: dict, node_id: str):
    return load_latent(server.output_file(history["outputs"][node_id]["latents"][0]))


def runtime_update(model, adapters, module_path, weight, probe, strength=1.0):
    """The pack's update of one layer, both ways: dense_delta placed in its rows (what a fold adds), and
    the layer's forward on `probe` with the LoRA active minus without (the separate path)."""
    from comfyui_flux_qlora.lora_ops.lora_runtime import LoraEntry, LoraStack, activate, install_hooks
    from comfyui_flux_qlora.nodes.comfy_glue import layer_base_weight

    module = model.model.diffusion_model.get_submodule(module_path)
    dense = torch.zeros_like(weight)
    for adapter in adapters:
        rows = dense if adapter.out_slice is None else dense.narrow(0, *adapter.out_slice)
        base = weight if adapter.out_slice is None else weight.narrow(0, *adapter.out_slice)
        rows += strength * adapter.dense_delta(base)
    install_hooks(model.model.diffusion_model, [module_path], layer_base_weight)
    stack = LoraStack([LoraEntry("walk", strength, {module_path: tuple(adapters)})])
    with torch.inference_mode():
        plain = module(probe)
        with activate(stack, root=model.model.diffusion_model):
            hooked = module(probe)
    return dense, hooked - plain
