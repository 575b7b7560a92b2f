"""Per-block LoRA strengths through a real ComfyUI server: FluxQApplyLoRA's block_weights against
the LoRA file with that block's tensors removed (bit for bit) or scaled (core's LoraLoaderModelOnly
on an unquantized copy), for FLUX.1 and, on ComfyUI 0.33.0, FLUX.2 [klein]; the compare grid's
block-weight rows against single renders. Block counts always come from the loaded model."""

import re

import gguf
import numpy as np
import pytest
import torch
from comfy_server import ExecutionFailed
from fluxq_testing import TINY, comfyui_version, dequantized_state_dict, saved_latent
from safetensors.torch import load_file, save_file

F16 = TINY["dev_gguf"]["F16"]
KLEIN = "fluxq-tiny-flux2-klein-4b-Q8_0.gguf"
BLOCK_KEY = re.compile(r"lora_unet_(double|single)_blocks_(\d+)_")
STRENGTH = 0.8


def per_block(lora: dict, weights: dict[str, float]) -> dict:
    """The LoRA with each block's update scaled by its weight ({"d0": 0.5, ...}; B scaled, so the
    update is): the oracle file. Weight 0 drops the block's tensors (the LoRA without that block)."""
    out = {}
    for key, value in lora.items():
        match = BLOCK_KEY.match(key)
        weight = weights.get(f"{match.group(1)[0]}{match.group(2)}", 1.0) if match else 1.0
        if weight == 0.0:
            continue
        out[key] = value * weight if weight != 1.0 and key.endswith("lora_up.weight") else value
    return out


def write(scratch_models, name: str, tensors: dict) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(scratch_models / "loras" / name))
    return name


def graph(gguf_name, latent_node="EmptySD3LatentImage", size=64):
    return {
        "gguf": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": gguf_name, "dequant_dtype": "auto"}},
        "te": {"class_type": "FluxQLoadTextEncodersGGUF", "inputs": {"clip_name": TINY["clip_l"], "t5_name": "none"}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["te", 0], "text": "a tiny random test"}},
        "latent": {"class_type": latent_node, "inputs": {"width": size, "height": size, "batch_size": 1}},
    }


def apply(model_ref, lora, block_weights=None, strength=STRENGTH):
    inputs = {"model": model_ref, "lora_name": lora, "strength_model": strength, "strength_clip": 0.0}
    if block_weights is not None:
        inputs["block_weights"] = block_weights
    return {"class_type": "FluxQApplyLoRA", "inputs": inputs}


def one_step(model_ref, prefix, cond="text"):
    return {
        f"{prefix}_ks": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": [cond, 0], "negative": [cond, 0], "latent_image": ["latent", 0],
            "seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_ks", 0], "filename_prefix": prefix}},
    }


@pytest.fixture(scope="module")
def f16_reference(scratch_models, models_dir):
    """The F16 GGUF as a .safetensors for core's UNETLoader: its F16 tensors kept F16 (lossless,
    1 GB rather than 2 of float32), the others dequantized by the gguf package."""
    name = "fluxq-tiny-dev-F16-unquantized.safetensors"
    path = scratch_models / "diffusion_models" / name
    tensors = {}
    for t in gguf.GGUFReader(str(models_dir / "diffusion_models" / F16)).tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        values = np.array(t.data) if t.tensor_type == gguf.GGMLQuantizationType.F16 \
            else gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = torch.from_numpy(np.ascontiguousarray(values).reshape(shape))
    save_file(tensors, str(path))
    del tensors
    yield name
    path.unlink()


def sampler(model_ref, prefix, decode=False):
    """FluxQSampler (the settings node's 1 step, seed 3) -> SaveLatent [and VAEDecode -> SaveImage]."""
    nodes = {
        f"{prefix}_ks": {"class_type": "FluxQSampler", "inputs": {
            "model": model_ref, "positive": ["text", 0], "settings": ["settings", 0], "seed": 3}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_ks", 0], "filename_prefix": prefix}},
    }
    if decode:
        nodes[f"{prefix}_image"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{prefix}_ks", 0], "vae": ["vae", 0]}}
        nodes[f"{prefix}_png"] = {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}_image", 0],
                                                                        "filename_prefix": prefix}}
    return nodes


def png_pixels(data: bytes):
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_flux1_block_weights_are_exact_and_grid_rows_equal_single_renders(comfy_server, scratch_models, models_dir,
                                                                           f16_reference):
    """One graph (one model load; 6 one-step samples of the 3072-wide tiny model): weight 0 against
    the file without that block, weight w against core on the unquantized copy with the file's block
    scaled, and the grid's block-weight rows against those single renders."""
    lora = load_file(str(models_dir / "loras" / TINY["lora"]))
    without_d0 = write(scratch_models, "bw-without-d0.safetensors", per_block(lora, {"d0": 0.0}))
    scaled = write(scratch_models, "bw-d0-half-s0-neg.safetensors", per_block(lora, {"d0": 0.5, "s0": -1.5}))
    settings = {"preset": "custom", "steps": 1, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
                "shift_mode": "model", "shift": 1.0, "width": 32, "height": 32, "denoise": 1.0}
    prompt = {
        **graph(F16, size=32),
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY["vae"]}},
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": settings},
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": f16_reference, "weight_dtype": "default"}},
        "off": apply(["gguf", 0], TINY["lora"], "d0=0"),
        "dropped": apply(["gguf", 0], without_d0),
        "weighted": apply(["gguf", 0], TINY["lora"], "d0=0.5, s0=-1.5"),
        "core": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": scaled,
                                                                 "strength_model": STRENGTH}},
        **sampler(["off", 0], "off", decode=True), **sampler(["dropped", 0], "dropped"),
        **sampler(["weighted", 0], "weighted", decode=True), **sampler(["core", 0], "core"),
        "grid": {"class_type": "FluxQCompareGrid", "inputs": {
            "model": ["gguf", 0], "positive": ["text", 0], "vae": ["vae", 0], "settings": ["settings", 0],
            "lora_name": TINY["lora"], "strengths": str(STRENGTH), "seeds": "3",
            "block_weight_rows": "d0=0\nmixed: d0=0.5, s0=-1.5"}},
    }
    history = comfy_server.run(prompt)
    outputs = history["outputs"]
    latent = {name: saved_latent(comfy_server, history, f"{name}_save") for name in ("off", "dropped", "weighted", "core")}
    assert torch.equal(latent["off"], latent["dropped"])
    torch.testing.assert_close(latent["weighted"], latent["core"], rtol=2e-4, atol=2e-4)
    assert not torch.allclose(latent["weighted"], latent["off"], atol=1e-3)
    assert "block weights d*=0.5, s*=-1.5" in outputs["weighted"]["text"][0]

    cells = outputs["grid"]["fluxq_cells"]
    assert [cell["label"] for cell in cells] == ["d0=0 @ 0.8 · seed 3", "mixed @ 0.8 · seed 3"]
    for cell, single in zip(cells, ("off", "weighted")):
        shown = png_pixels(comfy_server.view(cell))
        render = png_pixels(comfy_server.output_file(outputs[f"{single}_png"]["images"][0]).read_bytes())
        assert (shown == render).all(), f"{single}: max difference {abs(shown - render).max()} / 255"
    header = outputs["grid"]["fluxq_grid"][0]["header"]
    assert "block weights per row (unnamed blocks 1): d0=0 = d*=0, mixed = d*=0.5, s*=-1.5" in header, header

    # the syntax at queue time (a prompt with one valid output would be queued with node_errors: the
    # bad node's output alone), the block numbers against the loaded model's counts when it runs
    base = {k: v for k, v in prompt.items() if k in ("gguf", "te", "text", "vae", "settings")}
    status, body = comfy_server.post_prompt({**base, "off": apply(["gguf", 0], TINY["lora"], "d0=0,5"),
                                             **sampler(["off", 0], "off")})
    assert status == 400 and "'0,5' is ambiguous" in str(body), body
    status, body = comfy_server.post_prompt({**base, "grid": {"class_type": "FluxQCompareGrid", "inputs": {
        **prompt["grid"]["inputs"], "block_weight_rows": "all\nd0=1 s0=0"}}})
    assert status == 400 and "block-weight rows, line 2" in str(body), body
    with pytest.raises(ExecutionFailed, match=r"'d0-9=1' names double block 9, but FLUX\.1 \[dev\] \(not a released "
                                              r"size: .*\) has 1 double block \(d0\)"):
        comfy_server.run({**base, "bad": apply(["gguf", 0], TINY["lora"], "d0-9=1"), **sampler(["bad", 0], "bad")})


def test_flux2_block_weights_leave_layers_outside_the_blocks_at_full_strength(comfy_server, scratch_models, models_dir):
    """FLUX.2 [klein] (0.33.0): block counts from the model; its shared modulation layers are in no
    block and keep weight 1, so "none" is exactly the LoRA of those layers alone."""
    if comfyui_version(comfy_server) < (0, 33, 0):
        pytest.skip("ComfyUI 0.3.75 cannot build the tiny FLUX.2 models (the loader refuses them, tested elsewhere)")
    weights = dequantized_state_dict(models_dir / "diffusion_models" / KLEIN)
    g = torch.Generator().manual_seed(7)
    lora = {}
    for key, weight in weights.items():
        if weight.dim() == 2 and key.startswith(("double_blocks.0.", "single_blocks.0.", "double_stream_modulation_img")):
            prefix = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
            lora[f"{prefix}.lora_down.weight"] = torch.randn(4, weight.shape[1], generator=g) / weight.shape[1] ** 0.5
            lora[f"{prefix}.lora_up.weight"] = 0.5 * torch.randn(weight.shape[0], 4, generator=g)
            lora[f"{prefix}.alpha"] = torch.tensor(4.0)
    name = write(scratch_models, "bw-klein.safetensors", lora)
    outside = write(scratch_models, "bw-klein-outside.safetensors", per_block(lora, {"d0": 0.0, "s0": 0.0}))
    scaled = write(scratch_models, "bw-klein-scaled.safetensors", per_block(lora, {"d0": 0.5, "s0": 2.0}))
    reference = scratch_models / "diffusion_models" / "fluxq-tiny-klein-unquantized.safetensors"
    save_file(weights, str(reference))
    prompt = {
        **graph(KLEIN, "EmptyFlux2LatentImage"),
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": reference.name, "weight_dtype": "default"}},
        "none": apply(["gguf", 0], name, "none"), "outside": apply(["gguf", 0], outside),
        "weighted": apply(["gguf", 0], name, "d0=0.5; s0=2"),
        "core": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": scaled,
                                                                 "strength_model": STRENGTH}},
        **{k: v for p in ("none", "outside", "weighted", "core") for k, v in one_step([p, 0], p).items()},
    }
    try:
        history = comfy_server.run(prompt)
    finally:
        reference.unlink()
    latent = {p: saved_latent(comfy_server, history, f"{p}_save") for p in ("none", "outside", "weighted", "core")}
    assert torch.equal(latent["none"], latent["outside"])
    torch.testing.assert_close(latent["weighted"], latent["core"], rtol=2e-4, atol=2e-4)
    assert not torch.allclose(latent["weighted"], latent["none"], atol=1e-3)
    with pytest.raises(ExecutionFailed, match=r"'s0-47=0' names single block 47, but FLUX\.2 \[klein\] .* has 1 single "
                                              r"block \(s0\)"):
        comfy_server.run({**prompt, "none": apply(["gguf", 0], name, "s0-47=0")})

