"""FluxQSampler against core's graphs, and FluxQCompareGrid's promises (baseline cell, same noise,
one LoRA load, no weight patches, progress, cancel, errors before sampling).

In-process tests call the nodes directly on the tiny models; the equivalence tests build the core
graph and ours in one prompt on a real ComfyUI server and compare the saved latents bit for bit.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from comfy_server import ExecutionFailed
from fluxq_testing import TINY, saved_latent

SIZE = 64  # 4 x 4 image tokens: the tiny model samples in well under a second per step on CPU


# ---- in-process -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sampling(pack):
    return importlib.import_module(pack.__name__ + ".nodes.sampling")


@pytest.fixture(scope="module")
def loaders(pack):
    return importlib.import_module(pack.__name__ + ".nodes.loaders")


@pytest.fixture(scope="module")
def dev_model(pack):
    # Core's loader on the F32 file: no per-step dequantization, so the grid tests stay quick on CPU;
    # the runtime LoRA path is the same for core and FluxQ GGUF models.
    import comfy.sd
    import folder_paths

    return comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", TINY["dev_f32"]))


@pytest.fixture(autouse=True)
def inference_mode():
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        yield


@pytest.fixture(scope="module")
def vae(pack):
    import comfy.sd
    import comfy.utils
    import folder_paths

    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("vae", TINY["vae"])))


@pytest.fixture(scope="module")
def positive():
    # The tiny model reads 768-wide text tokens and a 768 pooled vector (CLIP-L's shapes).
    generator = torch.Generator().manual_seed(7)
    return [[torch.randn(1, 8, 768, generator=generator), {"pooled_output": torch.randn(1, 768, generator=generator)}]]


def settings_for(sampling, preset="custom", steps=2, width=SIZE, height=SIZE, **overrides):
    values = dict(preset=preset, steps=steps, guidance=3.5, sampler_name="euler", scheduler="simple",
                  shift_mode="auto", shift=1.0, width=width, height=height, denoise=1.0)
    values.update(overrides)
    return sampling.FluxQSamplerSettings.execute(**values).result[0]


def plain_render(sampling, model, positive, vae, settings, seed):
    latent = sampling.FluxQSampler.execute(model, positive, settings, seed).result[0]
    return vae.decode(latent["samples"])[0].cpu()


def run_grid(sampling, model, positive, vae, settings, **inputs):
    values = dict(lora_name=TINY["lora"], strengths="0, 1", seeds="0, 1")
    values.update(inputs)
    return sampling.FluxQCompareGrid.execute(model, positive, vae, settings, **values)


def test_presets_fill_in_their_values(sampling):
    dev = settings_for(sampling, "flux-dev", steps=5, guidance=1.0, sampler_name="dpmpp_2m")
    assert (dev.steps, dev.guidance, dev.sampler_name, dev.scheduler, dev.shift_mode) == (28, 3.5, "euler", "simple", "auto")
    schnell = settings_for(sampling, "flux-schnell")
    assert (schnell.steps, schnell.guidance, schnell.shift_mode, schnell.shift) == (4, None, "fixed", 1.0)
    custom = settings_for(sampling, steps=7, guidance=2.0)
    assert (custom.steps, custom.guidance) == (7, 2.0)


def test_sizes_must_be_multiples_of_16(sampling):
    with pytest.raises(ValueError, match="width 72 is not a multiple of 16"):
        settings_for(sampling, width=72)


def test_schnell_never_gets_model_sampling_flux_and_dev_gets_core_mu(sampling, dev_model, loaders):
    import comfy.model_sampling
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    schnell = loaders.FluxQLoadGGUF.execute(TINY["schnell_gguf"], "auto").result[0]
    for mode in ("auto", "fixed"):
        patched = sampling.shifted_model(schnell, settings_for(sampling, shift_mode=mode), 1024, 1024)
        assert not isinstance(patched.get_model_object("model_sampling"), comfy.model_sampling.ModelSamplingFlux)
    shifted = sampling.shifted_model(schnell, settings_for(sampling, shift_mode="fixed", shift=3.0), 1024, 1024)
    assert shifted.get_model_object("model_sampling").shift == 3.0

    core = ModelSamplingFlux().patch(dev_model, 1.15, 0.5, 768, 1280)[0].get_model_object("model_sampling")
    ours = sampling.shifted_model(dev_model, settings_for(sampling), 768, 1280).get_model_object("model_sampling")
    assert ours.shift == core.shift and torch.equal(ours.sigmas, core.sigmas)
    fixed = sampling.shifted_model(dev_model, settings_for(sampling, shift_mode="fixed", shift=3.1582), 64, 64)
    assert sampling.shift_factor(fixed) == pytest.approx(3.1582)


def test_strength_zero_cell_equals_plain_render_and_columns_share_noise(sampling, dev_model, positive, vae,
                                                                        monkeypatch):
    import comfy.sample

    settings = settings_for(sampling)
    noises = []
    prepare_noise = comfy.sample.prepare_noise

    def recording_prepare_noise(latent, seed, batch_index=None):
        noise = prepare_noise(latent, seed, batch_index)
        noises.append((seed, noise))
        return noise

    monkeypatch.setattr(comfy.sample, "prepare_noise", recording_prepare_noise)
    out = run_grid(sampling, dev_model, positive, vae, settings)
    grid_image, cells = out.result
    assert cells.shape == (4, SIZE, SIZE, 3) and grid_image.shape[0] == 1
    assert [seed for seed, _ in noises] == [0, 1, 0, 1]
    assert torch.equal(noises[0][1], noises[2][1]) and torch.equal(noises[1][1], noises[3][1])

    for seed, cell in ((0, cells[0]), (1, cells[1])):
        assert torch.equal(cell, plain_render(sampling, dev_model, positive, vae, settings, seed))
    assert not torch.equal(cells[0], cells[2]), "strength 1 should change the image"

    payload = out.ui
    assert [c["label"] for c in payload["fluxq_cells"]] == [
        "strength 0 · seed 0", "strength 0 · seed 1", "strength 1 · seed 0", "strength 1 · seed 1"]
    assert all(c["type"] == "temp" and c["filename"].endswith(".png") for c in payload["fluxq_cells"])
    assert payload["fluxq_grid"][0]["rows"] == ["strength 0", "strength 1"]


def test_grid_loads_the_lora_once_and_patches_no_weights(sampling, dev_model, positive, vae, monkeypatch):
    loads, clones = [], []
    load_lora_entry, with_lora_stack = sampling.load_lora_entry, sampling.with_lora_stack

    def counting_load(*args, **kwargs):
        loads.append(args[1])
        return load_lora_entry(*args, **kwargs)

    def recording_with_lora_stack(model, stack):
        clones.append(with_lora_stack(model, stack))
        return clones[-1]

    monkeypatch.setattr(sampling, "load_lora_entry", counting_load)
    monkeypatch.setattr(sampling, "with_lora_stack", recording_with_lora_stack)
    run_grid(sampling, dev_model, positive, vae, settings_for(sampling, steps=1), strengths="0, 0.5, 1", seeds="3")
    assert loads == [TINY["lora"]]
    assert len(clones) == 3
    assert all(clone.model is dev_model.model and not clone.patches for clone in clones)


def apply_lora(sampling, model, name, strength):
    """What FluxQApplyLoRA does, through the same glue."""
    entry = sampling.load_lora_entry(model, name, strength)[0]
    return sampling.with_lora_stack(model, sampling.get_lora_stack(model).with_lora(entry))


def test_upstream_lora_is_varied_not_reloaded_and_lora_vs_lora(sampling, dev_model, positive, vae, monkeypatch):
    settings = settings_for(sampling, steps=2)
    with_lora = apply_lora(sampling, dev_model, TINY["lora"], 0.3)
    at_one = apply_lora(sampling, dev_model, TINY["lora"], 1.0)
    b_at_one = apply_lora(sampling, dev_model, TINY["lora_b"], 1.0)

    loads = []
    load_lora_entry = sampling.load_lora_entry
    monkeypatch.setattr(sampling, "load_lora_entry", lambda *a, **k: loads.append(a[1]) or load_lora_entry(*a, **k))
    out = run_grid(sampling, with_lora, positive, vae, settings, strengths="1", seeds="5",
                   lora_name_b=TINY["lora_b"], difference=True)
    assert loads == [TINY["lora_b"]], "the upstream LoRA must be varied, only B loaded"
    assert out.ui["fluxq_grid"][0]["rows"] == ["no LoRA", "A @ 1", "B @ 1"]
    _, cells = out.result
    assert torch.equal(cells[0], plain_render(sampling, dev_model, positive, vae, settings, 5))
    assert torch.equal(cells[1], plain_render(sampling, at_one, positive, vae, settings, 5))
    assert torch.equal(cells[2], plain_render(sampling, b_at_one, positive, vae, settings, 5))


def test_progress_covers_every_step_of_every_cell(sampling, dev_model, positive, vae, monkeypatch):
    import comfy.utils

    updates = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        updates.append((value, total)))
    run_grid(sampling, dev_model, positive, vae, settings_for(sampling, steps=2), seeds="0")
    values = [value for value, total in updates if total == 4]
    # What the user sees, also under ComfyUI 0.33's throttled bar (first, last, then at most every
    # ~100 ms): the bar starts at the first step, only moves forward and ends full.
    assert values and values[0] <= 1 and values[-1] == 4
    assert values == sorted(values)


def test_cancel_stops_between_cells(sampling, dev_model, positive, vae):
    import comfy.model_management

    decoded = []

    class InterruptingVAE:
        def decode(self, samples):
            decoded.append(samples)
            comfy.model_management.interrupt_current_processing()  # as the UI's Cancel does
            return vae.decode(samples)

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_grid(sampling, dev_model, positive, InterruptingVAE(), settings_for(sampling, steps=1))
    assert len(decoded) == 1


@pytest.mark.parametrize(("inputs", "message"), [
    (dict(strengths="0, half"), "strengths: item 2 \\('half'\\) is not a number"),
    (dict(seeds=" "), "seeds is empty"),
    (dict(strengths=", ".join(str(i / 10) for i in range(1, 34)), seeds="0, 1"), "66 cells, over the limit of 64"),
])
def test_bad_lists_fail_before_any_sampling(sampling, dev_model, positive, vae, inputs, message, monkeypatch):
    monkeypatch.setattr(sampling, "sample_latent", lambda *a, **k: pytest.fail("sampled despite bad input"))
    with pytest.raises(ValueError, match=message):
        run_grid(sampling, dev_model, positive, vae, settings_for(sampling), **inputs)


# ---- against core, on a real server -----------------------------------------------------------

def encode_graph(clip_name):
    return {
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_name, "type": "stable_diffusion"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a red fox in snow"}},
    }


def ours(model_ref, preset, width, height, seed):
    return {
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": {
            "preset": preset, "steps": 1, "guidance": 1.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "shift_mode": "fixed", "shift": 9.0, "width": width, "height": height, "denoise": 1.0}},
        "ours": {"class_type": "FluxQSampler", "inputs": {
            "model": model_ref, "positive": ["pos", 0], "settings": ["settings", 0], "seed": seed}},
        "save_ours": {"class_type": "SaveLatent", "inputs": {"samples": ["ours", 0], "filename_prefix": "ours"}},
    }


def core_ksampler(model_ref, positive_ref, steps, width, height, seed):
    return {
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "core": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": positive_ref, "negative": ["pos", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "save_core": {"class_type": "SaveLatent", "inputs": {"samples": ["core", 0], "filename_prefix": "core"}},
    }


@pytest.mark.server
def test_dev_preset_equals_model_sampling_flux_flux_guidance_ksampler(comfy_server):
    width, height, seed = 64, 48, 11  # not square, so the auto shift's size dependence counts
    prompt = {
        **encode_graph(TINY["clip_l"]),
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY["dev_f32"], "weight_dtype": "default"}},
        "msf": {"class_type": "ModelSamplingFlux", "inputs": {
            "model": ["unet", 0], "max_shift": 1.15, "base_shift": 0.5, "width": width, "height": height}},
        "guided": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}},
        **core_ksampler(["msf", 0], ["guided", 0], 28, width, height, seed),
        **ours(["unet", 0], "flux-dev", width, height, seed),
    }
    history = comfy_server.run(prompt)
    core, mine = saved_latent(comfy_server, history, "save_core"), saved_latent(comfy_server, history, "save_ours")
    assert core.shape == (1, 16, height // 8, width // 8)
    assert torch.equal(core, mine)


@pytest.mark.server
def test_schnell_preset_equals_plain_ksampler(comfy_server):
    seed = 4
    prompt = {
        **encode_graph(TINY["clip_l"]),
        "unet": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY["schnell_gguf"], "dequant_dtype": "auto"}},
        **core_ksampler(["unet", 0], ["pos", 0], 4, SIZE, SIZE, seed),
        **ours(["unet", 0], "flux-schnell", SIZE, SIZE, seed),
    }
    history = comfy_server.run(prompt)
    assert torch.equal(saved_latent(comfy_server, history, "save_core"), saved_latent(comfy_server, history, "save_ours"))


@pytest.mark.server
def test_grid_over_the_api_sends_the_compare_payload_and_rejects_bad_lists(comfy_server):
    prompt = {
        **encode_graph(TINY["clip_l"]),
        "unet": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY["dev_gguf"]["Q8_0"], "dequant_dtype": "auto"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY["vae"]}},
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": {
            "preset": "custom", "steps": 1, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
            "shift_mode": "auto", "shift": 1.0, "width": SIZE, "height": SIZE, "denoise": 1.0}},
        "grid": {"class_type": "FluxQCompareGrid", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "vae": ["vae", 0], "settings": ["settings", 0],
            "lora_name": TINY["lora"], "strengths": "0, 1", "seeds": "0, 1"}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["grid", 0], "filename_prefix": "grid"}},
    }
    history = comfy_server.run(prompt)
    cells = history["outputs"]["grid"]["fluxq_cells"]
    assert [(c["row"], c["col"]) for c in cells] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(comfy_server.view(c).startswith(b"\x89PNG") for c in cells)
    assert comfy_server.output_file(history["outputs"]["save"]["images"][0]).exists()

    prompt["grid"]["inputs"]["strengths"] = "0, lots"
    status, body = comfy_server.post_prompt(prompt)
    assert status == 400 and "item 2 ('lots') is not a number" in str(body)


@pytest.mark.server
def test_grid_takes_a_lora_file_name_from_a_link_instead_of_the_dropdown(comfy_server):
    """A connected lora_file (here from core's String node, in a workflow from FluxQTrainLoRA)
    replaces lora_name, which is then not checked at queue time (the file may not exist yet)."""
    settings = {"preset": "custom", "steps": 1, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
                "shift_mode": "auto", "shift": 1.0, "width": SIZE, "height": SIZE, "denoise": 1.0}
    grid_inputs = {"model": ["unet", 0], "positive": ["pos", 0], "vae": ["vae", 0], "settings": ["settings", 0],
                   "strengths": "1", "seeds": "0"}
    prompt = {
        **encode_graph(TINY["clip_l"]),
        "unet": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY["dev_gguf"]["Q8_0"], "dequant_dtype": "auto"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY["vae"]}},
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": settings},
        "name": {"class_type": "PrimitiveString", "inputs": {"value": TINY["lora"]}},
        "by_widget": {"class_type": "FluxQCompareGrid", "inputs": {**grid_inputs, "lora_name": TINY["lora"]}},
        "by_link": {"class_type": "FluxQCompareGrid", "inputs": {
            **grid_inputs, "lora_name": "not-written-yet.safetensors", "lora_file": ["name", 0]}},
    }
    history = comfy_server.run(prompt)
    widget_cells, link_cells = (history["outputs"][node]["fluxq_cells"] for node in ("by_widget", "by_link"))
    assert link_cells[0]["label"] == widget_cells[0]["label"]
    assert comfy_server.view(link_cells[0]) == comfy_server.view(widget_cells[0])

    prompt["name"]["inputs"]["value"] = "../escape.safetensors"
    with pytest.raises(ExecutionFailed, match=r"lora_file: '\.\./escape\.safetensors' is not a file"):
        comfy_server.run(prompt)
    del prompt["by_link"]["inputs"]["lora_file"]  # without the link the dropdown value is checked again
    del prompt["by_widget"]  # (a prompt with one valid output would be queued with node_errors)
    status, body = comfy_server.post_prompt(prompt)
    assert status == 400 and "lora_name: 'not-written-yet.safetensors' is not a file" in str(body)
def grid_prompt(model_loader: dict, steps=1, **grid_inputs) -> dict:
    """CLIP-L text, the VAE, settings and a FluxQCompareGrid on the MODEL of node "unet"."""
    settings = {"preset": "custom", "steps": steps, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
                "shift_mode": "auto", "shift": 1.0, "width": SIZE, "height": SIZE, "denoise": 1.0}
    settings.update(grid_inputs.pop("settings", {}))
    inputs = {"model": ["unet", 0], "positive": ["pos", 0], "vae": ["vae", 0], "settings": ["settings", 0],
              "lora_name": TINY["lora"], "strengths": "0, 1", "seeds": "0"}
    inputs.update(grid_inputs)
    return {
        **encode_graph(TINY["clip_l"]),
        "unet": model_loader,
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY["vae"]}},
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": settings},
        "grid": {"class_type": "FluxQCompareGrid", "inputs": inputs},
    }


GGUF_Q8 = {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY["dev_gguf"]["Q8_0"], "dequant_dtype": "auto"}}


@pytest.mark.server
@pytest.mark.parametrize(("strengths", "message"), [
    ("0,75", "'0,75' is ambiguous"),  # was two rows, strength 0 and strength 75
    ("0, 1e3", "item 2 ('1e3') is outside -10..10"),
])
def test_grid_refuses_a_decimal_comma_and_strengths_out_of_range_at_queue_time(comfy_server, strengths, message):
    status, body = comfy_server.post_prompt(grid_prompt(GGUF_Q8, strengths=strengths))
    assert status == 400 and message in str(body), body


DEV_F32 = {"class_type": "UNETLoader", "inputs": {"unet_name": TINY["dev_f32"], "weight_dtype": "default"}}


@pytest.mark.server
def test_grid_header_states_the_guidance_the_model_gets_and_warns_on_a_preset_model_mismatch(comfy_server):
    """schnell's preset on a dev model used to say "no guidance" while the model got core's 3.5."""
    prompt = grid_prompt(DEV_F32, strengths="0", settings={"preset": "flux-schnell", "width": 16, "height": 16})
    header = comfy_server.run(prompt)["outputs"]["grid"]["fluxq_grid"][0]["header"]
    assert "guidance 3.5 (ComfyUI's default: nothing set it)" in header[1], header
    assert any(line.startswith("warning: preset flux-schnell is for FLUX.1 [schnell], but the model is FLUX.1 [dev]") for line in header), header


def test_summary_follows_the_model_not_the_preset(sampling, dev_model, loaders, positive):
    """dev's preset on schnell used to read "guidance 3.5", which schnell has no input for."""
    schnell = loaders.FluxQLoadGGUF.execute(TINY["schnell_gguf"], "auto").result[0]
    dev_on_schnell = settings_for(sampling, "flux-dev")
    model, conditioning = sampling.prepare(schnell, positive, dev_on_schnell, sampling.empty_latent(dev_on_schnell))
    assert "no guidance (the model has no guidance input)" in sampling.settings_summary(dev_on_schnell, model, conditioning)
    warning = sampling.preset_warning(dev_on_schnell, schnell)
    assert warning.startswith("warning: preset flux-dev is for FLUX.1 [dev]") and "the model is FLUX.1 [schnell]" in warning

    schnell_on_dev = settings_for(sampling, "flux-schnell")
    model, conditioning = sampling.prepare(dev_model, positive, schnell_on_dev, sampling.empty_latent(schnell_on_dev))
    assert "guidance 3.5 (ComfyUI's default" in sampling.settings_summary(schnell_on_dev, model, conditioning)
    custom = settings_for(sampling, guidance=2.0)
    model, conditioning = sampling.prepare(dev_model, positive, custom, sampling.empty_latent(custom))
    assert "· guidance 2 ·" in sampling.settings_summary(custom, model, conditioning)
    assert sampling.preset_warning(custom, dev_model) is None and sampling.preset_warning(custom, schnell) is None


def png_pixels(data: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.server
def test_grid_baseline_is_the_unpatched_base_when_the_lora_came_in_through_core(comfy_server):
    """The same LoRA through core LoraLoaderModelOnly used to stay in every cell: "strength 0"
    rendered it at 1.0 (measured: the baseline equalled the core-LoRA render, max difference 0.43)."""
    prompt = grid_prompt(GGUF_Q8, strengths="0, 1", seeds="0")
    prompt["core_lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": TINY["lora"], "strength_model": 1.0}}
    prompt["grid"]["inputs"]["model"] = ["core_lora", 0]
    prompt.update({
        "base": {"class_type": "FluxQSampler", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "settings": ["settings", 0], "seed": 0}},
        "base_image": {"class_type": "VAEDecode", "inputs": {"samples": ["base", 0], "vae": ["vae", 0]}},
        "base_save": {"class_type": "SaveImage", "inputs": {"images": ["base_image", 0], "filename_prefix": "base"}},
    })
    outputs = comfy_server.run(prompt)["outputs"]
    base = png_pixels(comfy_server.output_file(outputs["base_save"]["images"][0]).read_bytes())
    baseline, lora = (png_pixels(comfy_server.view(cell)) for cell in outputs["grid"]["fluxq_cells"])
    assert (baseline == base).all(), f"max difference {abs(baseline - base).max()} / 255"
    assert abs(lora - base).max() > 8, "strength 1 still shows the LoRA"
    header = outputs["grid"]["fluxq_grid"][0]["header"]
    assert any(line.startswith("baseline (strength 0): the base model, without the core LoRA patches of") for line in header), header


@pytest.mark.server
def test_grid_with_denoise_below_one_needs_a_latent_and_starts_every_cell_from_it(comfy_server):
    """denoise < 1 without a start latent used to denoise an empty latent silently."""
    prompt = grid_prompt(DEV_F32, strengths="0", settings={"denoise": 0.5, "width": 16, "height": 16})
    with pytest.raises(ExecutionFailed, match="denoise is 0.5, but the grid has no latent_image"):
        comfy_server.run(prompt)

    prompt.update({
        "image": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0xC03020}},
        "start": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0]}},
        "plain": {"class_type": "FluxQSampler", "inputs": {
            "model": ["unet", 0], "positive": ["pos", 0], "settings": ["settings", 0], "seed": 0,
            "latent_image": ["start", 0]}},
        "plain_image": {"class_type": "VAEDecode", "inputs": {"samples": ["plain", 0], "vae": ["vae", 0]}},
        "plain_save": {"class_type": "SaveImage", "inputs": {"images": ["plain_image", 0], "filename_prefix": "plain"}},
    })
    prompt["grid"]["inputs"]["latent_image"] = ["start", 0]
    outputs = comfy_server.run(prompt)["outputs"]
    plain = png_pixels(comfy_server.output_file(outputs["plain_save"]["images"][0]).read_bytes())
    (cell,) = (png_pixels(comfy_server.view(cell)) for cell in outputs["grid"]["fluxq_cells"])
    assert (cell == plain).all()
