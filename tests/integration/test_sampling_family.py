"""FluxQSampler / FluxQCompareGrid for the FLUX family: each preset and the new inputs (negative +
real CFG, reference latent, Flux2Scheduler's sigmas) equal the core graph a user would build, bit
for bit through a real server; and the grid's header is truthful about the CLIP (issue 21 item 4).

Kontext, Krea and dev share their tensors, so FLUX.1 dev's tiny model stands in for them.
"""

from __future__ import annotations

import pytest
import torch
from fluxq_testing import TINY, comfyui_version, saved_latent

W, H = 32, 48  # not square: the size-dependent shifts count

DEV_F32 = {"class_type": "UNETLoader", "inputs": {"unet_name": TINY["dev_f32"], "weight_dtype": "default"}}


def text_nodes() -> dict:
    return {
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY["clip_l"], "type": "stable_diffusion"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a red fox in snow"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "blurry, grey"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY["vae"]}},
        # a reference image as a user would have it: pixels through VAE Encode
        "image": {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0x3080C0}},
        "ref": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0]}},
    }


def ours(preset: str, seed: int, steps: int = 1, **extra) -> dict:
    settings = {"preset": preset, "steps": steps, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
                "shift_mode": "auto", "shift": 1.0, "width": W, "height": H, "denoise": 1.0, "cfg": 1.0}
    settings.update(extra.pop("settings", {}))
    return {
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": settings},
        "ours": {"class_type": "FluxQSampler", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "settings": ["settings", 0], "seed": seed, **extra}},
        "save_ours": {"class_type": "SaveLatent", "inputs": {"samples": ["ours", 0], "filename_prefix": "ours"}},
    }


def save_core(samples_ref) -> dict:
    return {"save_core": {"class_type": "SaveLatent", "inputs": {"samples": samples_ref, "filename_prefix": "core"}}}


def assert_same(server, prompt: dict, shape=(1, 16, H // 8, W // 8)):
    history = server.run(prompt)
    core, mine = saved_latent(server, history, "save_core"), saved_latent(server, history, "save_ours")
    assert core.shape == shape and bool(core.isfinite().all()), "a comparison of non-finite latents proves nothing"
    assert torch.equal(core, mine), f"max difference {float((core - mine).abs().max())}"
    return history


# Widgets a preset must ignore (all different from every preset's values).
IGNORED_WIDGETS = {"steps": 7, "guidance": 9.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
                   "shift_mode": "fixed", "shift": 2.0, "cfg": 7.0}


def assert_preset_is_custom(pack, preset: str, **values):
    """Preset ``preset`` is exactly the custom settings ``values``, whatever its widgets say: the
    core comparisons below can then run custom with the preset's values on fewer steps (its 30 or
    35 steps on the 3072-wide tiny models took up to two minutes on CI's CPUs)."""
    import dataclasses
    import importlib

    sampling = importlib.import_module(pack.__name__ + ".nodes.sampling")
    size = {"width": W, "height": H, "denoise": 1.0}
    ours = sampling.FluxQSamplerSettings.execute(preset, **IGNORED_WIDGETS, **size).result[0]
    custom = sampling.FluxQSamplerSettings.execute("custom", **{**IGNORED_WIDGETS, **values}, **size).result[0]
    assert dataclasses.replace(ours, preset="custom", needs=()) == custom


@pytest.mark.server
def test_kontext_preset_equals_reference_latent_flux_guidance_ksampler(comfy_server, pack):
    """flux-kontext: 30 steps, guidance 2.5 (BFL's cli_kontext), the image as a reference latent;
    compared with core on 2 of its steps."""
    kontext = {"guidance": 2.5, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "shift_mode": "auto"}
    assert_preset_is_custom(pack, "flux-kontext", steps=30, **kontext)
    seed, steps = 3, 2
    prompt = {
        **text_nodes(), "unet": DEV_F32,
        "msf": {"class_type": "ModelSamplingFlux", "inputs": {
            "model": ["unet", 0], "max_shift": 1.15, "base_shift": 0.5, "width": W, "height": H}},
        "with_ref": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["pos", 0], "latent": ["ref", 0]}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["with_ref", 0], "guidance": 2.5}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "core": {"class_type": "KSampler", "inputs": {
            "model": ["msf", 0], "positive": ["guided", 0], "negative": ["guided", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        **save_core(["core", 0]),
        **ours("custom", seed, steps=steps, reference_latent=["ref", 0], settings=kontext),
    }
    assert_same(comfy_server, prompt)

    # without the reference the preset's node warns (the preset is for an edit); denoise 0 samples nothing
    del prompt["ours"]["inputs"]["reference_latent"]
    prompt = {k: v for k, v in prompt.items() if k in text_nodes() or k in ("unet", "settings", "ours", "save_ours")}
    prompt["settings"]["inputs"].update(preset="flux-kontext", denoise=0.0)
    comfy_server.run(prompt)
    assert "warning: preset flux-kontext without a reference in the conditioning" in comfy_server.log_tail()


@pytest.mark.server
def test_chroma_preset_equals_cfg_with_a_negative_on_ksampler(comfy_server, pack):
    """chroma: 35 steps, real CFG 5 with the negative, euler / simple on the model's own sampling
    (ComfyUI's Chroma graph: KSampler, no ModelSamplingFlux, no FluxGuidance); compared with core on
    one step. Chroma has no guidance input: the preset leaves the conditioning alone, and custom's
    guidance 0 is what ComfyUI's Chroma reads when none is set."""
    chroma = {"cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "shift_mode": "model"}
    assert_preset_is_custom(pack, "chroma", steps=35, guidance=None, **chroma)
    seed = 4
    prompt = {  # the tiny Chroma exists as GGUF only: both graphs sample the model FluxQLoadGGUF loaded
        **text_nodes(), "unet": tiny_member("chroma"),
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "core": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        **save_core(["core", 0]),
        **ours("custom", seed, steps=1, negative=["neg", 0], settings={**chroma, "guidance": 0.0}),
    }
    assert_same(comfy_server, prompt)


@pytest.mark.server
def test_real_cfg_with_a_negative_and_flux2_schedule_equal_cfg_guider_and_sampler_custom_advanced(comfy_server):
    """klein base's recipe (Flux2Scheduler, CFGGuider cfg 5 with a negative, reference latents on both
    conditionings as in ComfyUI's klein edit blueprint) on the FLUX.1 dev tensors: the guider path is
    the family's, the model only supplies the predictions."""
    seed, steps = 5, 2
    prompt = {
        **text_nodes(), "unet": DEV_F32,
        "pos_ref": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["pos", 0], "latent": ["ref", 0]}},
        "neg_ref": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["neg", 0], "latent": ["ref", 0]}},
        "guider": {"class_type": "CFGGuider", "inputs": {
            "model": ["unet", 0], "positive": ["pos_ref", 0], "negative": ["neg_ref", 0], "cfg": 5.0}},
        "sigmas": {"class_type": "Flux2Scheduler", "inputs": {"steps": steps, "width": W, "height": H}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "core": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        **save_core(["core", 0]),
        # custom: no guidance set (the conditioning keeps core's default, as the core graph above)
        **ours("custom", seed, steps=steps, negative=["neg", 0], reference_latent=["ref", 0],
               settings={"shift_mode": "flux2", "cfg": 5.0}),
    }
    prompt["settings"]["inputs"]["guidance"] = 3.5  # core's default: the core graph sets none
    assert_same(comfy_server, prompt)


@pytest.mark.server
def test_real_cfg_on_the_ksampler_route_and_a_missing_negative(comfy_server):
    seed = 8
    prompt = {
        **text_nodes(), "unet": DEV_F32,
        "msf": {"class_type": "ModelSamplingFlux", "inputs": {
            "model": ["unet", 0], "max_shift": 1.15, "base_shift": 0.5, "width": W, "height": H}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "core": {"class_type": "KSampler", "inputs": {
            "model": ["msf", 0], "positive": ["guided", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        **save_core(["core", 0]),
        **ours("custom", seed, steps=2, negative=["neg", 0], settings={"cfg": 3.0}),
    }
    assert_same(comfy_server, prompt)

    del prompt["ours"]["inputs"]["negative"]
    from comfy_server import ExecutionFailed

    with pytest.raises(ExecutionFailed, match="cfg is 3 .*needs a negative conditioning"):
        comfy_server.run(prompt)


def test_every_member_has_its_presets_and_the_sources_are_the_registry(pack):
    import importlib

    sampling = importlib.import_module(pack.__name__ + ".nodes.sampling")
    from comfyui_flux_qlora.lora_ops import flux_family

    assert set(sampling.PRESETS) == set(flux_family.PRESET_NAMES)
    for member in flux_family.MEMBERS:
        assert member.presets, f"{member.id} has no preset"
    # FLUX.1 dev / schnell exactly as before (workflows saved with them must not change)
    assert sampling.PRESETS["flux-dev"] == dict(steps=28, guidance=3.5, cfg=1.0, sampler_name="euler",
                                                scheduler="simple", shift_mode="auto")
    assert sampling.PRESETS["flux-schnell"] == dict(steps=4, guidance=None, cfg=1.0, sampler_name="euler",
                                                    scheduler="simple", shift_mode="fixed", shift=1.0)
    assert sampling.PRESETS["flux2-klein-base"]["cfg"] > 1 and sampling.PRESETS["chroma"]["cfg"] > 1
    assert (sampling.PRESETS["flux-kontext"]["guidance"], sampling.PRESETS["flux-fill"]["guidance"]) == (2.5, 30.0)
    assert sampling.PRESETS["flux2-dev"]["shift_mode"] == "flux2" and sampling.PRESETS["flux2-dev"]["guidance"] == 4.0


@pytest.mark.server
def test_grid_header_is_truthful_about_the_clip_and_a_missing_zero_row(comfy_server, clip_lora):
    """Issue 21 item 4: a prompt encoded by the CLIP carrying the LoRA's text-encoder part used to be
    labelled "baseline (strength 0): the base model"; strengths -10, 10 had the same line with no
    strength-0 row at all."""
    prompt = {
        **text_nodes(), "unet": DEV_F32,
        "apply": {"class_type": "FluxQApplyLoRA", "inputs": {
            "model": ["unet", 0], "lora_name": clip_lora, "strength_model": 1.0, "clip": ["clip", 0],
            "strength_clip": 1.0}},
        "lora_pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["apply", 1], "text": "a red fox in snow"}},
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": {
            "preset": "custom", "steps": 1, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
            "shift_mode": "auto", "shift": 1.0, "width": 16, "height": 16, "denoise": 1.0}},
        "grid": {"class_type": "FluxQCompareGrid", "inputs": {
            "model": ["apply", 0], "positive": ["lora_pos", 0], "vae": ["vae", 0], "settings": ["settings", 0],
            "lora_name": clip_lora, "strengths": "0, 1", "seeds": "0"}},
    }
    header = comfy_server.run(prompt)["outputs"]["grid"]["fluxq_grid"][0]["header"]
    assert any(line.startswith(f"note: the CLIP part of {clip_lora} @ 1 was applied upstream") for line in header), header
    assert "the strength-0 row included, which is then not the base model" in " ".join(header)

    prompt["grid"]["inputs"]["strengths"] = "-10, 10"
    header = comfy_server.run(prompt)["outputs"]["grid"]["fluxq_grid"][0]["header"]
    assert not any(line.startswith("baseline") for line in header), header
    assert any(line.startswith("no strength-0 row") for line in header), header


@pytest.mark.server
@pytest.mark.parametrize("grid_is_output", [True, False])
def test_grid_reports_a_bad_input_once_not_once_per_input(comfy_server, grid_is_output):
    """Issue 21 item 6: one bad strengths list came back as four identical errors (one per input
    the node's check takes: lora_name, lora_name_b, strengths, seeds)."""
    prompt = {
        **text_nodes(), "unet": DEV_F32,
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": {
            "preset": "custom", "steps": 1, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
            "shift_mode": "auto", "shift": 1.0, "width": 16, "height": 16, "denoise": 1.0}},
        "grid": {"class_type": "FluxQCompareGrid", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "vae": ["vae", 0], "settings": ["settings", 0],
            "lora_name": TINY["lora"], "lora_name_b": "none", "strengths": "0,75", "seeds": "0"}},
    }
    if not grid_is_output:  # checked as an input of SaveImage ("inner" validation)
        prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["grid", 0], "filename_prefix": "g"}}
    status, body = comfy_server.post_prompt(prompt)
    assert status == 400, body
    errors = body["node_errors"]["grid"]["errors"]
    assert len(errors) == 1, errors
    assert "strengths: '0,75' is ambiguous" in errors[0]["details"], errors


# ---- FLUX.2 and Fill: the tiny members are 128 wide, which only ComfyUI 0.33's detection builds ----

def tiny_member(member_id: str) -> dict:
    return {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": f"fluxq-tiny-{member_id}-Q8_0.gguf",
                                                      "dequant_dtype": "auto"}}


def needs_0_33(server):
    if comfyui_version(server) < (0, 33, 0):
        pytest.skip("ComfyUI 0.3.75 cannot build the 128-wide tiny FLUX.2 / Fill models (its detection fixes the "
                    "heads); the loader's refusal is tested in test_flux_family.py")


def flux2_core(model_ref, positive_ref, negative_ref, cfg, steps, seed) -> dict:
    """Core's FLUX.2 graph (ComfyUI 0.33.0's blueprints): Flux2Scheduler + CFGGuider (BasicGuider at
    cfg 1: the same predictions) + KSamplerSelect + RandomNoise + SamplerCustomAdvanced."""
    return {
        "guider": {"class_type": "CFGGuider", "inputs": {
            "model": model_ref, "positive": positive_ref, "negative": negative_ref, "cfg": cfg}},
        "sigmas": {"class_type": "Flux2Scheduler", "inputs": {"steps": steps, "width": W, "height": H}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "latent": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "core": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        **save_core(["core", 0]),
    }


FLUX2_LATENT = (1, 128, H // 16, W // 16)


@pytest.mark.server
def test_flux2_dev_preset_equals_flux_guidance_flux2_scheduler_basic_guider(comfy_server):
    needs_0_33(comfy_server)
    seed = 2
    prompt = {
        **text_nodes(), "unet": tiny_member("flux2-dev"),
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 4.0}},
        **flux2_core(["unet", 0], ["guided", 0], ["guided", 0], 1.0, 20, seed),
        **ours("flux2-dev", seed),
    }
    prompt["basic"] = {"class_type": "BasicGuider", "inputs": {"model": ["unet", 0], "conditioning": ["guided", 0]}}
    prompt["core"]["inputs"]["guider"] = ["basic", 0]  # the blueprint's guider
    assert_same(comfy_server, prompt, FLUX2_LATENT)


@pytest.mark.server
def test_klein_presets_equal_core_graphs_and_warn_on_the_wrong_member(comfy_server):
    needs_0_33(comfy_server)
    seed = 6
    distilled = {
        **text_nodes(), "unet": tiny_member("flux2-klein-4b"),
        **flux2_core(["unet", 0], ["pos", 0], ["pos", 0], 1.0, 4, seed),
        **ours("flux2-klein-distilled", seed),
    }
    assert_same(comfy_server, distilled, FLUX2_LATENT)

    # base, as ComfyUI's klein edit blueprint: cfg 5 with a negative, the reference on both conditionings
    base = {
        **text_nodes(), "unet": tiny_member("flux2-klein-4b"),
        # (a fixed latent: the random tiny FLUX.2 VAE's encoding is not finite)
        "ref": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
        "pos_ref": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["pos", 0], "latent": ["ref", 0]}},
        "neg_ref": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["neg", 0], "latent": ["ref", 0]}},
        **flux2_core(["unet", 0], ["pos_ref", 0], ["neg_ref", 0], 5.0, 20, seed),
        **ours("flux2-klein-base", seed, negative=["neg", 0], reference_latent=["ref", 0]),
    }
    assert_same(comfy_server, base, FLUX2_LATENT)

    # FLUX.1's dev preset on klein: a warning on the node, in the log
    wrong = {k: v for k, v in distilled.items() if k in text_nodes() or k in ("unet", "settings", "ours", "save_ours")}
    wrong["settings"]["inputs"]["preset"] = "flux-dev"
    comfy_server.run(wrong)
    assert "warning: preset flux-dev is for FLUX.1 [dev]" in comfy_server.log_tail()


@pytest.mark.server
def test_fill_preset_equals_inpaint_model_conditioning_flux_guidance_ksampler(comfy_server):
    """ComfyUI 0.33.0's Fill blueprint: InpaintModelConditioning (image + mask), FluxGuidance 30,
    KSampler 20 steps euler / normal on the model's own sampling."""
    needs_0_33(comfy_server)
    seed = 9
    prompt = {
        **text_nodes(), "unet": tiny_member("flux1-fill-dev"),
        "mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": W, "height": H}},
        "inpaint": {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["vae", 0], "pixels": ["image", 0],
            "mask": ["mask", 0], "noise_mask": True}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["inpaint", 0], "guidance": 30.0}},
        "core": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "positive": ["guided", 0], "negative": ["inpaint", 1], "latent_image": ["inpaint", 2],
            "seed": seed, "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        **save_core(["core", 0]),
        **ours("flux-fill", seed, negative=["inpaint", 1], latent_image=["inpaint", 2]),
    }
    prompt["ours"]["inputs"]["positive"] = ["inpaint", 0]
    assert_same(comfy_server, prompt)
