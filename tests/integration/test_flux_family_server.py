"""The FLUX family through a real ComfyUI server: each member's tiny GGUF loads through
FluxQLoadGGUF, says what it is, and samples like core's UNETLoader on its dequantized copy; other
architectures, what this ComfyUI cannot run, and LoRAs of another member are refused clearly."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fluxq_testing import TINY, comfyui_version, dequantized_state_dict, expect_error, saved_latent

MEMBERS = {
    # member id -> (latent node, its channels, guidance or None, steps, label on the node)
    "flux2-dev": ("EmptyFlux2LatentImage", 128, 4.0, 2, "FLUX.2 [dev] (not a released size: hidden 128"),
    "flux2-klein-4b": ("EmptyFlux2LatentImage", 128, None, 2, "FLUX.2 [klein] (not a released size: hidden 128"),
    "flux1-fill-dev": ("EmptySD3LatentImage", 16, 30.0, 2, "FLUX.1 Fill [dev] (not a released size: hidden 128"),
    # 3072 wide (its approximator fixes the width): ~0.62 B parameters, so one step; runs on 0.3.75 too
    "chroma": ("EmptySD3LatentImage", 16, None, 1, "Chroma (not a released size: hidden 3072"),
}


def tiny_member(member_id):
    return f"fluxq-tiny-{member_id}-Q8_0.gguf"


def needs_0_33(server):
    if comfyui_version(server) < (0, 33, 0):
        pytest.skip("ComfyUI 0.3.75 builds only the released widths (its detection fixes the heads); refusal tested below")


def text_encoder():
    return {
        "te": {"class_type": "FluxQLoadTextEncodersGGUF", "inputs": {"clip_name": TINY["clip_l"], "t5_name": "none"}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["te", 0], "text": "a tiny random test"}},
    }


def sample_graph(model_ref, prefix, latent_node, guidance, steps):
    cond = ["text", 0]
    nodes = {}
    if guidance is not None:
        nodes[f"{prefix}_guid"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": cond, "guidance": guidance}}
        cond = [f"{prefix}_guid", 0]
    nodes.update({
        f"{prefix}_latent": {"class_type": latent_node, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}_ks": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": cond, "negative": cond, "latent_image": [f"{prefix}_latent", 0],
            "seed": 5, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_ks", 0], "filename_prefix": prefix}},
    })
    return nodes


def loader(name, node_id="gguf"):
    return {node_id: {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": name, "dequant_dtype": "auto"}}}


@pytest.mark.parametrize("member_id", MEMBERS)
def test_member_loads_says_what_it_is_and_samples_like_core(comfy_server, models_dir, scratch_models, member_id):
    latent_node, channels, guidance, steps, label = MEMBERS[member_id]
    if "hidden 128" in label:  # 0.3.75 builds only the released widths
        needs_0_33(comfy_server)
    reference = f"fluxq-tiny-{member_id}-dequantized.safetensors"
    reference_path = scratch_models / "diffusion_models" / reference
    save_file(dequantized_state_dict(models_dir / "diffusion_models" / tiny_member(member_id)), str(reference_path))
    prompt = {
        **text_encoder(), **loader(tiny_member(member_id)),
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": reference, "weight_dtype": "default"}},
        **sample_graph(["gguf", 0], "ours", latent_node, guidance, steps),
        **sample_graph(["unet", 0], "core", latent_node, guidance, steps),
    }
    try:
        history = comfy_server.run(prompt)
    finally:
        reference_path.unlink()  # up to 2.5 GB of float32 (Chroma)
    ours, core = (saved_latent(comfy_server, history, f"{p}_save") for p in ("ours", "core"))
    assert ours.shape[1] == channels and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-4)
    report = history["outputs"]["gguf"]["text"][0]
    assert report.startswith(f"{tiny_member(member_id)}: detected {label}"), report
    if member_id == "flux2-klein-4b":
        assert "distilled and base checkpoints have identical tensors" in report


def klein_loras(tensors, seed=4):
    """A hosted-trainer PEFT LoRA (BFL names under `base_model.model.`, which core does not read), its
    ai-toolkit twin (`diffusion_model.`, which core reads), and an ai-toolkit LoKr, on every linear."""
    g = torch.Generator().manual_seed(seed)
    peft, twin, lokr = {}, {}, {}
    for key, weight in tensors.items():
        if weight.dim() != 2:  # FLUX.2's 2-D tensors are its linear layers' weights
            continue
        path, (rows, cols) = key[: -len(".weight")], weight.shape
        down, up = torch.randn(4, cols, generator=g) / cols ** 0.5, 0.3 * torch.randn(rows, 4, generator=g)
        for prefix, sd in (("base_model.model.", peft), ("diffusion_model.", twin)):
            sd |= {f"{prefix}{path}.lora_A.weight": down, f"{prefix}{path}.lora_B.weight": up}
        lokr |= {f"diffusion_model.{path}.lokr_w1": torch.randn(4, 4, generator=g),
                 f"diffusion_model.{path}.lokr_w2_a": 0.1 * torch.randn(rows // 4, 2, generator=g),
                 f"diffusion_model.{path}.lokr_w2_b": 0.1 * torch.randn(2, cols // 4, generator=g),
                 f"diffusion_model.{path}.alpha": torch.tensor(3.0)}
    return peft, twin, lokr


def test_klein_peft_and_lokr_loras_sample_like_core(comfy_server, models_dir, scratch_models):
    """The user path: FluxQApplyLoRA twice on the quantized klein against core's UNETLoader +
    LoraLoaderModelOnly twice on the dequantized copy (core reads the PEFT file's ai-toolkit twin);
    the per-layer oracles for every format are in test_lora_family.py."""
    needs_0_33(comfy_server)
    klein = models_dir / "diffusion_models" / tiny_member("flux2-klein-4b")
    tensors = dequantized_state_dict(klein)
    reference = "fluxq-tiny-klein-lora-reference.safetensors"
    save_file(tensors, str(scratch_models / "diffusion_models" / reference))
    names = ("klein-peft.safetensors", "klein-aitoolkit-twin.safetensors", "klein-lokr.safetensors")
    for name, sd in zip(names, klein_loras(tensors)):
        save_file(sd, str(scratch_models / "loras" / name))

    def apply(node, model_ref, lora_name, strength):
        inputs = {"model": model_ref, "lora_name": lora_name, "strength_model": strength}
        return {"class_type": node, "inputs": inputs | ({"strength_clip": 1.0} if node == "FluxQApplyLoRA" else {})}

    prompt = {
        **text_encoder(), **loader(tiny_member("flux2-klein-4b")),
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": reference, "weight_dtype": "default"}},
        "ours1": apply("FluxQApplyLoRA", ["gguf", 0], names[0], 0.8),
        "ours2": apply("FluxQApplyLoRA", ["ours1", 0], names[2], -0.6),
        "core1": apply("LoraLoaderModelOnly", ["unet", 0], names[1], 0.8),
        "core2": apply("LoraLoaderModelOnly", ["core1", 0], names[2], -0.6),
        **sample_graph(["ours2", 0], "ours", "EmptyFlux2LatentImage", None, 1),
        **sample_graph(["core2", 0], "core", "EmptyFlux2LatentImage", None, 1),
        **sample_graph(["gguf", 0], "plain", "EmptyFlux2LatentImage", None, 1),
    }
    history = comfy_server.run(prompt)
    ours, core, plain = (saved_latent(comfy_server, history, f"{p}_save") for p in ("ours", "core", "plain"))
    assert (ours - plain).abs().max() > 1e-2  # the LoRAs change the result
    torch.testing.assert_close(ours, core, rtol=1e-4, atol=1e-4)
    for node, lora_name in (("ours1", names[0]), ("ours2", names[2])):
        report = history["outputs"][node]["text"][0]
        assert f"{lora_name} (" in report and "19 modules matched, 0 keys unmatched" in report, report


def test_dev_file_names_kontext_and_krea_as_indistinguishable(pack):
    from comfyui_flux_qlora.nodes.loaders import FluxQLoadGGUF

    from fluxq_testing import node_class_for_prompt

    output = node_class_for_prompt(FluxQLoadGGUF, "7").execute(TINY["dev_gguf"]["Q8_0"], "auto", "off")
    report = output.ui["text"][0]
    assert "detected FLUX.1 [dev]" in report
    assert "FLUX.1 Kontext [dev], FLUX.1 Krea [dev] have identical tensors" in report


def test_other_architecture_is_refused_naming_what_comfyui_detected(comfy_server, scratch_models):
    """A GGUF labelled 'flux' holding an SD3 (MMDiT) transformer: ComfyUI's detection sees SD3."""
    from lora_ops.gguf_write import flux_qtype_for, write_gguf

    rng = np.random.default_rng(0)
    sd3 = {"joint_blocks.0.context_block.attn.qkv.weight": rng.standard_normal((192, 64), dtype=np.float32),
           "x_embedder.proj.weight": rng.standard_normal((64, 16, 2, 2), dtype=np.float32),
           "final_layer.linear.weight": rng.standard_normal((64, 64), dtype=np.float32)}
    write_gguf(scratch_models / "diffusion_models" / "sd3-labelled-flux.gguf", sd3, flux_qtype_for(8))
    expect_error(comfy_server, {**loader("sd3-labelled-flux.gguf"), **text_encoder(),
                                **sample_graph(["gguf", 0], "sd3", "EmptySD3LatentImage", None, 1)},
                 "sd3-labelled-flux.gguf: ComfyUI detects it as SD3, not a FLUX family model",
                 "accepted: Flux, FluxSchnell, FluxInpaint, Flux2, Chroma")


def test_what_comfyui_0_3_75_cannot_build_is_refused_naming_0_33_0(comfy_server):
    if comfyui_version(comfy_server) >= (0, 33, 0):
        pytest.skip("ComfyUI 0.33.0 runs them (test above)")
    graph = {**text_encoder(), **sample_graph(["gguf", 0], "old", "EmptySD3LatentImage", None, 1)}
    expect_error(comfy_server, {**loader(tiny_member("flux2-klein-4b")), **graph},
                 "FLUX.2 [klein]", "needs ComfyUI 0.33.0 or newer", "this is ComfyUI 0.3.75")
    for member_id, label in (("flux2-dev", "FLUX.2 [dev]"), ("flux1-fill-dev", "FLUX.1 Fill [dev]")):
        expect_error(comfy_server, {**loader(tiny_member(member_id)), **graph},
                     label, "needs ComfyUI 0.33.0 or newer at this width")


def kohya_lora(shapes: dict[str, tuple[int, int]], seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, (rows, cols) in shapes.items():
        prefix = "lora_unet_" + module.replace(".", "_")
        out[prefix + ".lora_down.weight"] = torch.randn(4, cols, generator=g)
        out[prefix + ".lora_up.weight"] = torch.randn(rows, 4, generator=g)
        out[prefix + ".alpha"] = torch.tensor(4.0)
    return out


def apply_graph(gguf_name, lora_name, latent_node):
    return {**loader(gguf_name), **text_encoder(),
            "apply": {"class_type": "FluxQApplyLoRA", "inputs": {"model": ["gguf", 0], "lora_name": lora_name,
                                                                  "strength_model": 1.0, "strength_clip": 1.0}},
            **sample_graph(["apply", 0], "x", latent_node, None, 1)}


def test_loras_of_another_family_member_are_refused_naming_both(comfy_server, scratch_models):
    needs_0_33(comfy_server)
    klein = tiny_member("flux2-klein-4b")
    # the FLUX.1 tiny LoRA: its keys name FLUX.1's per-block modulation
    expect_error(comfy_server, apply_graph(klein, TINY["lora"], "EmptyFlux2LatentImage"),
                 f"{TINY['lora']} is a FLUX.1 LoRA", "FLUX.2 [klein]")
    # attention only, shapes that fit klein: refused by block count (19 double blocks: FLUX.1's)
    (scratch_models / "loras").mkdir(exist_ok=True)
    save_file(kohya_lora({f"double_blocks.{i}.img_attn.qkv": (384, 128) for i in range(19)}),
              str(scratch_models / "loras" / "flux1-attention-only.safetensors"))
    expect_error(comfy_server, apply_graph(klein, "flux1-attention-only.safetensors", "EmptyFlux2LatentImage"),
                 "targets 19 double and 0 single blocks (fits FLUX.1 [dev]", "the model is FLUX.2 [klein]")


def test_a_flux2_lora_on_flux1_is_refused_naming_both(comfy_server, scratch_models):
    """ai-toolkit names FLUX.2's global modulation, which FLUX.1 has not."""
    (scratch_models / "loras").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(1)
    flux2_lora = {"diffusion_model.double_stream_modulation_img.lin.lora_A.weight": torch.randn(4, 3072, generator=g),
                  "diffusion_model.double_stream_modulation_img.lin.lora_B.weight": torch.randn(18432, 4, generator=g)}
    save_file(flux2_lora, str(scratch_models / "loras" / "flux2-modulation.safetensors"))
    expect_error(comfy_server, apply_graph(TINY["dev_gguf"]["Q8_0"], "flux2-modulation.safetensors", "EmptySD3LatentImage"),
                 "flux2-modulation.safetensors is a FLUX.2 LoRA", "FLUX.1 [dev]")


def test_a_lora_within_the_models_blocks_but_of_the_other_generations_shapes_is_refused(comfy_server, scratch_models):
    """Only the double blocks' attention is shaped alike in FLUX.1 and FLUX.2 at one width: a LoRA that
    stays within the model's blocks and names no generation-only layer, but whose MLP and single-block
    layers have the other generation's proportions, is refused naming both (not applied, nor a shape error)."""
    (scratch_models / "loras").mkdir(exist_ok=True)

    def block_zero(h, mlp_in_rows, linear1_rows, linear2_cols):
        return kohya_lora({"double_blocks.0.img_attn.qkv": (3 * h, h), "double_blocks.0.img_mlp.0": (mlp_in_rows, h),
                           "single_blocks.0.linear1": (linear1_rows, h), "single_blocks.0.linear2": (h, linear2_cols)})

    # klein's proportions (SwiGLU MLP 3h, gate and value fused) at the tiny dev's width
    save_file(block_zero(3072, 6 * 3072, 9 * 3072, 4 * 3072),
              str(scratch_models / "loras" / "klein-shaped.safetensors"))
    expect_error(comfy_server, apply_graph(TINY["dev_gguf"]["Q8_0"], "klein-shaped.safetensors", "EmptySD3LatentImage"),
                 "klein-shaped.safetensors is a FLUX.2 LoRA", "FLUX.2's shapes", "FLUX.1 [dev]")
    if comfyui_version(comfy_server) < (0, 33, 0):
        return  # the tiny klein needs 0.33 (tested above)
    # FLUX.1's proportions (GELU MLP 4h) at the tiny klein's width
    save_file(block_zero(128, 4 * 128, 7 * 128, 5 * 128), str(scratch_models / "loras" / "flux1-shaped.safetensors"))
    expect_error(comfy_server, apply_graph(tiny_member("flux2-klein-4b"), "flux1-shaped.safetensors",
                                           "EmptyFlux2LatentImage"),
                 "flux1-shaped.safetensors is a FLUX.1 LoRA", "FLUX.2 [klein]")
