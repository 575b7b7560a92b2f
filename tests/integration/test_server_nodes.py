"""The loader and LoRA nodes inside a real ComfyUI server, driven through /prompt and /history."""

import math

import pytest
import torch
from safetensors.torch import save_file

from fluxq_testing import TINY, dequantized_state_dict, expect_error, saved_latent, tiny_gguf_path

FLUXQ_NODES = {"FluxQLoadGGUF", "FluxQLoadTextEncodersGGUF", "FluxQApplyLoRA", "FluxQRemoveLoRA"}


def txt2img(model_ref, prefix, seed=3):
    """Nodes after a MODEL: core text encoding, FluxGuidance, KSampler, SaveLatent (ids namespaced by prefix)."""
    return {
        f"{prefix}_guid": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": 3.5}},
        f"{prefix}_latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}_ks": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": [f"{prefix}_guid", 0], "negative": [f"{prefix}_guid", 0],
            "latent_image": [f"{prefix}_latent", 0], "seed": seed, "steps": 2, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_ks", 0], "filename_prefix": prefix}},
    }


def text_encoder():
    return {
        "te": {"class_type": "FluxQLoadTextEncodersGGUF", "inputs": {"clip_name": TINY["clip_l"], "t5_name": "none"}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["te", 0], "text": "a tiny random test"}},
    }


def gguf_loader(name, node_id="gguf"):
    return {node_id: {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": name, "dequant_dtype": "auto"}}}


@pytest.fixture(scope="module")
def q8_reference(scratch_models, models_dir):
    """The Q8_0 file dequantized by the gguf package, as a .safetensors for core's UNETLoader."""
    name = "fluxq-tiny-dev-Q8_0-dequantized.safetensors"
    path = scratch_models / "diffusion_models" / name
    save_file(dequantized_state_dict(tiny_gguf_path(models_dir, "Q8_0")), str(path))
    yield name
    path.unlink()  # 2 GB of float32


def test_every_node_is_registered_under_the_pack_category(comfy_server):
    info = comfy_server.get("/object_info")
    ours = {name: node for name, node in info.items() if name.startswith("FluxQ")}
    assert FLUXQ_NODES <= set(ours)
    assert all(node["category"].startswith("Flux QLoRA Lab") for node in ours.values())
    assert TINY["dev_gguf"]["Q8_0"] in info["FluxQLoadGGUF"]["input"]["required"]["gguf_name"][1]["options"]


def test_gguf_and_lora_nodes_match_core_nodes_in_one_graph(comfy_server, q8_reference):
    """Q8_0 via FluxQLoadGGUF vs core UNETLoader on its dequantization; FluxQApplyLoRA vs
    LoraLoaderModelOnly; FluxQRemoveLoRA back to the base, bit for bit."""
    lora, strength = TINY["lora"], 0.8
    prompt = {
        **text_encoder(),
        **gguf_loader(TINY["dev_gguf"]["Q8_0"]),
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": q8_reference, "weight_dtype": "default"}},
        "ours_lora": {"class_type": "FluxQApplyLoRA", "inputs": {"model": ["gguf", 0], "lora_name": lora, "strength_model": strength, "strength_clip": 1.0}},
        "core_lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": lora, "strength_model": strength}},
        "removed": {"class_type": "FluxQRemoveLoRA", "inputs": {"model": ["ours_lora", 0], "lora_name": lora}},
        **txt2img(["gguf", 0], "base"),
        **txt2img(["unet", 0], "core_base"),
        **txt2img(["ours_lora", 0], "lora"),
        **txt2img(["core_lora", 0], "core_lora"),
        **txt2img(["removed", 0], "removed"),
    }
    history = comfy_server.run(prompt)
    latent = {name: saved_latent(comfy_server, history, f"{name}_save")
              for name in ("base", "core_base", "lora", "core_lora", "removed")}
    assert torch.isfinite(latent["base"]).all()
    torch.testing.assert_close(latent["base"], latent["core_base"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latent["lora"], latent["core_lora"], rtol=2e-4, atol=2e-4)
    assert not torch.allclose(latent["lora"], latent["base"], atol=1e-3)
    assert torch.equal(latent["removed"], latent["base"])
    assert "0 keys unmatched" in history["outputs"]["ours_lora"]["text"][0]


def _lora_graph(lora_name):
    return {**gguf_loader(TINY["dev_gguf"]["Q8_0"]),
            "apply": {"class_type": "FluxQApplyLoRA", "inputs": {"model": ["gguf", 0], "lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0}},
            **text_encoder(), **txt2img(["apply", 0], "bad")}


def test_bad_gguf_files_fail_clearly_and_the_server_keeps_serving(comfy_server, scratch_models, models_dir):
    source = tiny_gguf_path(models_dir, "Q8_0").read_bytes()[:4096]
    (scratch_models / "diffusion_models" / "truncated.gguf").write_bytes(source)
    expect_error(comfy_server, {**gguf_loader("truncated.gguf"), **text_encoder(), **txt2img(["gguf", 0], "t")},
                  "truncated.gguf")

    (scratch_models / "diffusion_models" / "garbage.gguf").write_bytes(b"not a gguf file at all" * 100)
    expect_error(comfy_server, {**gguf_loader("garbage.gguf"), **text_encoder(), **txt2img(["gguf", 0], "g")},
                  "garbage.gguf")

    # a missing model is ComfyUI's normal validation error (HTTP 400), not a crash
    status, body = comfy_server.post_prompt({**gguf_loader("no-such-model.gguf"), **text_encoder(), **txt2img(["gguf", 0], "m")})
    assert status == 400 and "no-such-model.gguf" in str(body)
    # reported once, against gguf_name (not also against dequant_dtype, as before)
    errors = body["node_errors"]["gguf"]["errors"]
    assert [e["details"].split(" - ")[0] for e in errors] == ["gguf_name"], body
    # the folders by the names the user knows, not the pack's registry key
    assert "diffusion_models" in errors[0]["details"] and "fluxq_" not in errors[0]["details"], body

    assert comfy_server.get("/system_stats")["system"]["comfyui_version"]


def test_bad_lora_files_fail_clearly(comfy_server, scratch_models):
    loras = scratch_models / "loras"
    (loras / "pickled.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    expect_error(comfy_server, _lora_graph("pickled.safetensors"), "pickled.safetensors")

    nan = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.full((4, 3072), math.nan),
           "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)}
    save_file(nan, str(loras / "nan.safetensors"))
    expect_error(comfy_server, _lora_graph("nan.safetensors"), "nan.safetensors", "lora_down")

    wrong_shape = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 100),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)}
    save_file(wrong_shape, str(loras / "wrong-shape.safetensors"))
    expect_error(comfy_server, _lora_graph("wrong-shape.safetensors"), "double_blocks.0.img_attn.qkv")

    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(320, 4)}
    save_file(sdxl, str(loras / "sdxl-style.safetensors"))
    expect_error(comfy_server, _lora_graph("sdxl-style.safetensors"), "matched no layer", "SDXL")

    # names from a prompt never leave the loras folder: ComfyUI rejects values not in the list
    status, body = comfy_server.post_prompt(_lora_graph("../../../etc/passwd"))
    assert status == 400


def test_applying_a_file_twice_and_removing_it_treat_model_and_clip_alike(comfy_server, clip_lora):
    """Two Apply LoRA(0.5) used to leave the MODEL at 0.5 (replaced) but the CLIP at 1.0 (two core
    patches), and Remove LoRA could not reach the CLIP. Now: the same file again replaces it on
    both, and removal gives the untouched CLIP back, bit for bit (compared through its conditioning:
    each text encoding samples the same base model with the same seed)."""
    def apply(node_id, model_ref, clip_ref):
        return {node_id: {"class_type": "FluxQApplyLoRA", "inputs": {
            "model": model_ref, "lora_name": clip_lora, "strength_model": 0.5, "clip": clip_ref, "strength_clip": 0.5}}}

    def encoded_sample(prefix, clip_ref):
        return {
            f"{prefix}_text": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_ref, "text": "a tiny random test"}},
            f"{prefix}_sample": {"class_type": "FluxQSampler", "inputs": {
                "model": ["unet", 0], "positive": [f"{prefix}_text", 0], "settings": ["settings", 0], "seed": 1}},
            f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_sample", 0],
                                                                      "filename_prefix": prefix}},
        }

    prompt = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY["dev_f32"], "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY["clip_l"], "type": "stable_diffusion"}},
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": {
            "preset": "custom", "steps": 1, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
            "shift_mode": "auto", "shift": 1.0, "width": 16, "height": 16, "denoise": 1.0}},
        **apply("once", ["unet", 0], ["clip", 0]),
        **apply("twice", ["once", 0], ["once", 1]),
        "removed": {"class_type": "FluxQRemoveLoRA", "inputs": {
            "model": ["twice", 0], "lora_name": clip_lora, "clip": ["twice", 1]}},
        **encoded_sample("untouched", ["clip", 0]),
        **encoded_sample("once", ["once", 1]),
        **encoded_sample("twice", ["twice", 1]),
        **encoded_sample("removed", ["removed", 1]),
    }
    history = comfy_server.run(prompt)
    latent = {key: saved_latent(comfy_server, history, f"{key}_save") for key in ("untouched", "once", "twice", "removed")}
    assert "0 keys unmatched" in history["outputs"]["once"]["text"][0]
    assert not torch.equal(latent["once"], latent["untouched"]), "the LoRA's CLIP part changes the conditioning"
    assert torch.equal(latent["twice"], latent["once"]), "the same file again replaces it on the CLIP too"
    assert torch.equal(latent["removed"], latent["untouched"]), "removal gives the untouched CLIP back"
