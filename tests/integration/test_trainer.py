"""FluxQTrainLoRA on real ComfyUI models, run in-process the way ComfyUI runs it (inference mode).

Two bases: the harness's tiny FLUX.1-dev GGUF (hidden 3072, the smallest ComfyUI detects: slow on
CPU, so a few steps only) for the QLoRA path and file compatibility, and a narrower FLUX built
from ComfyUI's own classes (hidden 128) for the learning, resume and determinism checks.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import zipfile

import pytest
import torch
from fluxq_testing import comfyui_is_0_33, node_class_for_prompt
from make_tiny_models import flux_params
from PIL import Image
from safetensors import safe_open

# `from conftest import` is ambiguous with tests/unit/conftest.py on the path: names spelled out.
TINY_CLIP_L, TINY_VAE, TINY_DEV_Q8 = "fluxq-tiny-clip_l.safetensors", "fluxq-tiny-ae.safetensors", "fluxq-tiny-dev-Q8_0.gguf"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 40, 220), "stripes": None}


@pytest.fixture(scope="module")
def comfy_libs(pack):
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import folder_paths

    train = importlib.import_module(f"{pack.__name__}.nodes.train")
    glue = importlib.import_module(f"{pack.__name__}.nodes.comfy_glue")
    return type("Libs", (), dict(comfy=comfy, folder_paths=folder_paths, train=train, glue=glue))


@pytest.fixture(scope="module")
def clip_vae(comfy_libs, models_dir):
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():
        clip = comfy.sd.load_clip([str(models_dir / "text_encoders" / TINY_CLIP_L)],
                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models_dir / "vae" / TINY_VAE)))
    return clip, vae


def narrow_flux(seed: int = 0):
    """A FLUX.1-dev-architecture ModelPatcher of hidden 128 (one head of 128, as FLUX's rotary
    axes need), random weights, built under inference_mode like a ComfyUI loader would."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(flux_params(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768,
        hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
    ))
    config.set_inference_dtype(torch.float32, None)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        base = config.get_model({})
        state = {}
        for name, t in base.diffusion_model.state_dict().items():
            if t.dim() >= 2:
                state[name] = torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5
            elif "norm" in name:
                state[name] = torch.ones(t.shape)
            else:
                state[name] = 0.02 * torch.randn(t.shape, generator=gen)
        base.diffusion_model.load_state_dict(state)
        device = comfy.model_management.get_torch_device()
        return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)


def pattern_image(name: str, size=(64, 64)) -> Image.Image:
    if COLOURS[name] is not None:
        return Image.new("RGB", size, COLOURS[name])
    image = Image.new("RGB", size, (250, 250, 250))
    for x in range(0, size[0], 8):
        image.paste((10, 10, 10), (x, 0, x + 4, size[1]))
    return image


@pytest.fixture
def folders(comfy_libs, tmp_path):
    """A fresh input/ and a fresh default loras folder per test."""
    fp = comfy_libs.folder_paths
    old_input = fp.get_input_directory()
    inputs, loras = tmp_path / "input", tmp_path / "loras"
    inputs.mkdir()
    loras.mkdir()
    fp.set_input_directory(str(inputs))
    fp.add_model_folder_path("loras", str(loras), is_default=True)
    yield inputs, loras
    fp.set_input_directory(old_input)
    fp.folder_names_and_paths["loras"][0].remove(str(loras))


def write_dataset(inputs, names, folder="set", captions=True):
    (inputs / folder).mkdir()
    for name in names:
        pattern_image(name).save(inputs / folder / f"{name}.png")
        if captions:
            (inputs / folder / f"{name}.txt").write_text(f"a {name} square")
    return folder


def node_args(model, clip, vae, **overrides):
    args = dict(
        dataset="set", trigger_word="TOK", rank=4, alpha=4.0, learning_rate=1e-3, steps=3, batch_size=1,
        gradient_accumulation=1, resolution=64, seed=0, optimizer="adamw", lr_schedule="constant",
        warmup_steps=0, caption_dropout=0.0, timestep_sampling="shift", gradient_checkpointing=True,
        layer_regex="", save_every=0, keep_last=3, lora_name="trained", resume="[none]",
    )
    args.update(overrides)
    return {"model": [model], "vae": [vae], "clip": [clip], **{k: [v] for k, v in args.items()}}


def train(comfy_libs, args, images=None, captions=None):
    node = node_class_for_prompt(comfy_libs.train.FluxQTrainLoRA, "7")
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return node.execute(images=images, captions=captions, **args)


def velocity_error(patcher, clip, vae, names, seed=1234) -> float:
    """Mean squared error of the model's x0 prediction over the training images at fixed noise and
    t (x0 error = t * velocity error for FLUX), through ComfyUI's apply_model and wrappers."""
    from lora_ops import dataset as ds

    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    gen = torch.Generator().manual_seed(seed)
    # what a sampler does: the patcher's wrappers (the runtime LoRA) ride in transformer_options
    options = {**patcher.model_options["transformer_options"], "wrappers": patcher.wrappers}
    total = 0.0
    with torch.inference_mode():
        for name in names:
            pixels = ds.image_to_tensor(pattern_image(name))[None]
            x0 = patcher.model.process_latent_in(vae.encode(pixels)).float()
            context, pooled = clip.encode_from_tokens(clip.tokenize(f"TOK, a {name} square"), return_pooled=True)
            for t in (0.3, 0.6, 0.9):
                noise = torch.randn(x0.shape, generator=gen)
                x_t = (1 - t) * x0 + t * noise
                sigma = torch.tensor([t])
                pred_x0 = patcher.model.apply_model(x_t, sigma, c_crossattn=context, y=pooled,
                                                    guidance=torch.tensor([1.0]), transformer_options=options)
                total += torch.mean((pred_x0 - x0) ** 2).item()
    return total / (3 * len(names))


def lora_tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# --- the QLoRA path on the harness's GGUF model ---------------------------------------------


def test_qlora_on_tiny_gguf_saves_a_lora_core_and_diffusers_load(comfy_libs, clip_vae, folders, models_dir, caplog):
    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red", "stripes"])
    with torch.inference_mode():
        model = comfy_libs.glue.load_flux_gguf(str(models_dir / "diffusion_models" / TINY_DEV_Q8))
    quantized = {n: p.clone() for n, p in model.model.diffusion_model.named_parameters() if p.dtype == torch.uint8}
    assert len(quantized) > 10

    out = train(comfy_libs, node_args(model, clip, vae, save_every=2, keep_last=1))
    trained_model, lora_file, curve = out.result
    assert lora_file == "trained.safetensors"
    assert curve.shape[0] == 1 and curve.shape[-1] == 3

    # the GGUF bytes were not touched, nor turned trainable
    for name, p in model.model.diffusion_model.named_parameters():
        if name in quantized:
            assert p.dtype == torch.uint8 and not p.requires_grad and torch.equal(p, quantized[name])

    tensors, metadata = lora_tensors(loras / lora_file)
    assert metadata["ss_steps"] == "3" and metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["modelspec.trigger_phrase"] == "TOK" and metadata["ss_num_train_images"] == "2"
    assert metadata["ss_base_model_version"] == "flux1" and metadata["ss_resolution"] == "(64, 64)"
    assert metadata["ss_sd_model_name"] == "flux1-dev"  # the registry's base_model of the detected member
    assert all(torch.isfinite(t).all() for t in tensors.values())
    ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
    assert any(t.abs().max() > 0 for t in ups), "up matrices start at zero and must have moved"
    from lora_ops.lora_checkpoint import load_train_state

    state, _ = load_train_state(str(loras / lora_file))
    assert state.step == 3 and len(state.loss_history) == 3
    assert all(torch.isfinite(torch.tensor(state.loss_history)))
    # save_every 2 wrote step 2; keep_last 1 kept it (the final file is not a step checkpoint)
    assert sorted(os.listdir(loras)) == ["trained.safetensors", "trained.trainstate",
                                         "trained_step000002.safetensors", "trained_step000002.trainstate"]

    # ComfyUI core: every key matched
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, key_map)
    assert "lora key not loaded" not in caplog.text
    modules = {k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")}
    assert len(patches) == len(modules) == 13  # 10 linears in the double block, 3 in the single block

    # diffusers' kohya converter takes every key (it raises on leftovers) to the modules we expect;
    # fused qkv and linear1 split into q/k/v (+ proj_mlp)
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    converted = _convert_kohya_flux_lora_to_diffusers(dict(tensors))
    targets = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert targets == {f"transformer.transformer_blocks.0.{m}" for m in (
        "norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")} | {
        f"transformer.single_transformer_blocks.0.{m}" for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")}

    assert_diffusers_applies_the_same_update(loras / lora_file, tensors, rank=4, alpha=4.0)

    # the MODEL output carries the LoRA in its runtime stack; the input model does not
    assert comfy_libs.glue.get_lora_stack(trained_model).names() == ("trained.safetensors",)
    assert comfy_libs.glue.get_lora_stack(model).names() == ()


def assert_diffusers_applies_the_same_update(path, ours, rank, alpha, hidden=3072):
    """The public diffusers path (FluxPipeline.lora_state_dict, then load_lora_adapter through PEFT)
    on a FluxTransformer2DModel shaped like the tiny FLUX (diffusers' kohya converter assumes
    hidden 3072): every module gets an adapter whose weight update equals ours, fused qkv and
    linear1 rows included. Built on the meta device and left uninitialised: only LoRAs are read."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=hidden // 128,
            joint_attention_dim=768, pooled_projection_dim=768, guidance_embeds=True,
        )
    transformer.to_empty(device="cpu")
    state_dict = FluxPipeline.lora_state_dict(str(path))
    transformer.load_lora_adapter(state_dict, prefix="transformer", adapter_name="ours")

    def delta(module, rows=None):
        base = "lora_unet_" + module.replace(".", "_")
        full = (alpha / rank) * ours[f"{base}.lora_up.weight"] @ ours[f"{base}.lora_down.weight"]
        return full if rows is None else full[rows[0] * hidden:rows[1] * hidden]

    expected = {
        "transformer_blocks.0.norm1.linear": delta("double_blocks.0.img_mod.lin"),
        "transformer_blocks.0.attn.to_q": delta("double_blocks.0.img_attn.qkv", (0, 1)),
        "transformer_blocks.0.attn.to_v": delta("double_blocks.0.img_attn.qkv", (2, 3)),
        "transformer_blocks.0.attn.add_k_proj": delta("double_blocks.0.txt_attn.qkv", (1, 2)),
        "transformer_blocks.0.attn.to_add_out": delta("double_blocks.0.txt_attn.proj"),
        "transformer_blocks.0.ff_context.net.2": delta("double_blocks.0.txt_mlp.2"),
        "single_transformer_blocks.0.attn.to_k": delta("single_blocks.0.linear1", (1, 2)),
        "single_transformer_blocks.0.proj_mlp": delta("single_blocks.0.linear1", (3, 7)),
        "single_transformer_blocks.0.proj_out": delta("single_blocks.0.linear2"),
        "single_transformer_blocks.0.norm.linear": delta("single_blocks.0.modulation.lin"),
    }
    adapted = {name for name, m in transformer.named_modules() if "ours" in getattr(m, "lora_A", {})}
    assert len(adapted) == 20 and set(expected) <= adapted
    for name, want in expected.items():
        assert want.abs().max() > 0, name
        torch.testing.assert_close(transformer.get_submodule(name).get_delta_weight("ours"), want,
                                   rtol=1e-4, atol=1e-8)


# --- learning, resume and determinism on the narrow FLUX ------------------------------------


def test_overfits_four_images_and_the_lora_moves_predictions_towards_the_target(comfy_libs, clip_vae, folders):
    clip, vae = clip_vae
    inputs, loras = folders
    names = ["red", "green", "blue", "stripes"]
    write_dataset(inputs, names)
    model = narrow_flux()
    out = train(comfy_libs, node_args(model, clip, vae, rank=8, alpha=8.0, steps=60, learning_rate=1e-2,
                                      batch_size=2, gradient_checkpointing=False, timestep_sampling="uniform"))
    trained_model, lora_file, _ = out.result
    from lora_ops.lora_checkpoint import load_train_state

    losses = load_train_state(str(loras / lora_file))[0].loss_history
    # The loss is noisy (random t and noise per step): compare ten-step means. Measured 1.77 -> 1.11.
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"loss fell only from {first:.3f} to {last:.3f}"

    before = velocity_error(model, clip, vae, names)
    after = velocity_error(trained_model, clip, vae, names)
    # at fixed noise and t the error is not noisy: measured 1.22 without the LoRA, 0.46 with it
    assert after < 0.5 * before, f"x0 error with the LoRA {after:.4f} vs without {before:.4f}"


def test_same_seed_same_lora_and_resume_continues_the_run(comfy_libs, clip_vae, folders):
    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red", "stripes", "blue"])
    settings = dict(steps=6, batch_size=2, caption_dropout=0.3, lr_schedule="cosine", warmup_steps=2)

    train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="a", **settings))
    train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="b", **settings))
    a, _ = lora_tensors(loras / "a.safetensors")
    b, _ = lora_tensors(loras / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # cancelled after step 4 (or the next reported one), then resumed from that checkpoint: the LoRA and loss curve of 6 straight steps
    import comfy.model_management

    with cancel_at_step(4) as pressed_at, pytest.raises(comfy.model_management.InterruptProcessingException):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="cut", **settings))
    comfy_libs.folder_paths.filename_list_cache.clear()
    train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="resumed",
                                resume=f"cut_step{pressed_at[0]:06d}.safetensors", **settings))
    resumed, metadata = lora_tensors(loras / "resumed.safetensors")
    assert metadata["ss_steps"] == "6"
    for k in a:
        torch.testing.assert_close(resumed[k], a[k], rtol=1e-5, atol=1e-6)
    from lora_ops.lora_checkpoint import load_train_state

    straight = load_train_state(str(loras / "a.safetensors"))[0].loss_history
    continued = load_train_state(str(loras / "resumed.safetensors"))[0].loss_history
    assert len(continued) == 6
    assert continued == pytest.approx(straight, rel=1e-5)


def test_images_and_captions_from_core_dataset_nodes(comfy_libs, clip_vae, folders):
    clip, vae = clip_vae
    _, loras = folders
    from lora_ops import dataset as ds

    images = [ds.image_to_tensor(pattern_image("red"))[None], ds.image_to_tensor(pattern_image("blue", (96, 48)))[None]]
    out = train(comfy_libs, node_args(narrow_flux(), clip, vae, dataset="[none]", steps=2, resolution=64),
                images=images, captions=["a red square", "a blue band"])
    _, metadata = lora_tensors(loras / out.result[1])
    assert metadata["ss_num_train_images"] == "2"


@contextlib.contextmanager
def cancel_at_step(step: int):
    """Presses ComfyUI's cancel at the progress report of `step` (the trainer reports after each
    step) and yields the list that receives the step it was pressed at. The hook then raises the
    interrupt as the server's own progress hook does (ComfyUI's main.py), so the trainer meets the
    cancel as an exception, not as a flag it polls; a cancel in the middle of a step is
    tests/integration/test_crash_safety.py's, through a real server."""
    import comfy.model_management
    import comfy.utils

    pressed_at = []

    def hook(value, total, preview, node_id=None, **_):
        if value >= step and not pressed_at:
            pressed_at.append(value)
            comfy.model_management.interrupt_current_processing(True)
        comfy.model_management.throw_exception_if_processing_interrupted()

    # ComfyUI 0.33's bar reports at most every ~100 ms / 0.5 %: unthrottled here, so the cancel
    # lands at `step` (what a user sees of the throttled bar is tested in test_sampling.py).
    throttle = {name: getattr(comfy.utils, name) for name in
                ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT") if hasattr(comfy.utils, name)}
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    for name in throttle:
        setattr(comfy.utils, name, 0)
    try:
        yield pressed_at
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        for name, value in throttle.items():
            setattr(comfy.utils, name, value)


def test_cancel_saves_a_checkpoint_after_the_current_step(comfy_libs, clip_vae, folders):
    import comfy.model_management

    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red"])
    with cancel_at_step(2) as pressed_at, pytest.raises(comfy.model_management.InterruptProcessingException):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, steps=50))
    assert not comfy.model_management.processing_interrupted()
    # the cancel takes effect within the step it was pressed in
    step = pressed_at[0]
    assert sorted(os.listdir(loras)) == [f"trained_step{step:06d}.safetensors", f"trained_step{step:06d}.trainstate"]


def test_replace_existing_keeps_the_earlier_run_until_the_new_one_saves_then_clears_its_files_and_samples(
        comfy_libs, clip_vae, work_folders, pack, caplog):
    """A plain LoRA file under the name is described as a file, not a run to resume; a new run
    cancelled before its first step finished leaves the earlier run's LoRA and samples; once it
    saves, both are gone. A sample_every no step reaches warns."""
    clip, vae = clip_vae
    inputs, loras, output, _ = work_folders
    write_dataset(inputs, ["red"])
    args = node_args(narrow_flux(), clip, vae, steps=1, sample_every=1, sample_prompts="TOK")
    train(comfy_libs, {**args, "sample_settings": [render_settings(pack, steps=1)]})
    assert os.listdir(output / "trained_samples") == ["trained_step000001_0.png"]

    (loras / "plain.safetensors").write_bytes((loras / "trained.safetensors").read_bytes())
    with pytest.raises(ValueError) as refused:
        train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="plain"))
    assert "plain.safetensors already exist(s)" in str(refused.value) and "`resume`" not in str(refused.value)

    def run(**overrides):
        return train(comfy_libs, node_args(narrow_flux(), clip, vae, replace_existing=True, steps=3, sample_every=5,
                                           sample_prompts="TOK", **overrides))

    with caplog.at_level("WARNING", logger="fluxq"), cancel_at_step(0), \
            pytest.raises(comfy_libs.glue.TrainingCancelled, match="nothing was saved"):
        run()
    assert "sample_every 5 is larger than the steps this run trains (1..3)" in caplog.text
    assert sorted(os.listdir(loras)) == ["plain.safetensors", "trained.safetensors", "trained.trainstate"]
    assert os.listdir(output / "trained_samples") == ["trained_step000001_0.png"]

    with cancel_at_step(2), pytest.raises(comfy_libs.glue.TrainingCancelled):
        run()
    assert sorted(os.listdir(loras)) == ["plain.safetensors", "trained_step000002.safetensors",
                                         "trained_step000002.trainstate"]
    assert os.listdir(output / "trained_samples") == []


def test_a_missing_class_images_folder_is_named_by_its_input(comfy_libs, clip_vae, folders):
    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red"])
    with pytest.raises(ValueError, match="^class_images 'gone': no such folder or archive in "):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, class_prompt="a square", class_images="gone"))
    assert os.listdir(loras) == []


def test_a_new_run_under_a_used_name_is_refused_unless_replacing_and_then_keeps_its_own_checkpoint(
        comfy_libs, clip_vae, folders):
    """Run 1 (6 steps, save every 2, keep 2) leaves steps 2 and 4; run 2 under the same name,
    cancelled at step 1, used to lose its step 1 to keep_last (run 1's higher numbers won)."""

    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red"])
    train(comfy_libs, node_args(narrow_flux(), clip, vae, steps=6, save_every=2, keep_last=2))
    first_run = sorted(os.listdir(loras))
    assert first_run == ["trained.safetensors", "trained.trainstate", "trained_step000002.safetensors",
                         "trained_step000002.trainstate", "trained_step000004.safetensors", "trained_step000004.trainstate"]

    with pytest.raises(ValueError, match="belong to an earlier training run.*replace_existing"):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, steps=6, save_every=2, keep_last=2))
    assert sorted(os.listdir(loras)) == first_run

    with cancel_at_step(1) as pressed_at, pytest.raises(comfy_libs.glue.TrainingCancelled) as cancelled:
        train(comfy_libs, node_args(narrow_flux(), clip, vae, steps=6, save_every=2, keep_last=2,
                                    replace_existing=True))
    assert pressed_at == [1] and cancelled.value.saved == "trained_step000001.safetensors"
    assert "continue with resume = trained_step000001.safetensors" in str(cancelled.value)
    # the earlier run's files went only because this run had saved one of its own
    assert sorted(os.listdir(loras)) == ["trained_step000001.safetensors", "trained_step000001.trainstate"]

    # and that checkpoint resumes, under the same name, without asking to replace anything
    comfy_libs.folder_paths.filename_list_cache.clear()
    train(comfy_libs, node_args(narrow_flux(), clip, vae, steps=3, save_every=1, keep_last=1,
                                resume="trained_step000001.safetensors"))
    assert sorted(os.listdir(loras)) == ["trained.safetensors", "trained.trainstate",
                                         "trained_step000002.safetensors", "trained_step000002.trainstate"]


# --- bad input: clear errors before training, nothing written --------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(lora_name="../escape"), "plain file name"),
    (dict(lora_name="sub/name"), "plain file name"),
    (dict(rank=300), "rank 300 is larger than layer"),
    (dict(layer_regex="^nothing_here"), "matches no linear layer"),
    (dict(layer_regex="(unclosed"), "not a valid regular expression"),
    (dict(dataset="[none]"), "no training images"),
    (dict(resolution=72), "multiple of 16"),
    (dict(dataset="evil.zip"), "points outside"),
    (dict(dataset="empty"), "holds no images"),
    (dict(dataset="../loras"), "outside the input folder"),  # V3 combos are not checked in 0.3.75
])
def test_bad_input_fails_before_training_and_writes_nothing(comfy_libs, clip_vae, folders, overrides, message):
    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red"])
    (inputs / "empty").mkdir()
    with zipfile.ZipFile(inputs / "evil.zip", "w") as z:
        z.writestr("../../evil.png", b"x")
    with pytest.raises(ValueError, match=message):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, **overrides))
    assert os.listdir(loras) == []


def test_resume_mismatch_is_refused(comfy_libs, clip_vae, folders):
    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red"])
    train(comfy_libs, node_args(narrow_flux(), clip, vae, steps=2, lora_name="base"))
    comfy_libs.folder_paths.filename_list_cache.clear()
    with pytest.raises(ValueError, match="rank=4"):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, rank=8, steps=4, resume="base.safetensors"))
    with pytest.raises(ValueError, match="already trained 2 steps"):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, steps=2, resume="base.safetensors"))



# --- in a real ComfyUI server ------------------------------------------------------------------


@pytest.mark.server
def test_server_trains_from_core_dataset_nodes_and_core_loraloader_loads_the_result(comfy_server, models_dir):
    """The graph a user builds: core's dataset loader feeds our trainer (lists into is_input_list),
    then core's LoraLoaderModelOnly loads the saved file and samples with it."""
    import uuid

    folder = comfy_server.input_dir / "train_set"
    folder.mkdir()
    for name in ("red", "stripes"):
        pattern_image(name).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square")
    name = f"server_{uuid.uuid4().hex[:8]}"
    prompt = {
        "model": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY_DEV_Q8, "dequant_dtype": "auto"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_CLIP_L, "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_VAE}},
        "data": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "train_set"}},
        "train": {"class_type": "FluxQTrainLoRA", "inputs": {
            "model": ["model", 0], "vae": ["vae", 0], "clip": ["clip", 0], "images": ["data", 0],
            "captions": ["data", 1], **{k: v[0] for k, v in node_args(None, None, None, dataset="[none]", steps=1,
                                                                          gradient_checkpointing=False,
                                                                          lora_name=name).items()
                                         if k not in ("model", "vae", "clip")}}},
    }
    # ComfyUI's default loras folder is the harness's own: remove what this test writes there
    written = [models_dir / "loras" / f"{name}{ext}" for ext in (".safetensors", ".trainstate")]
    try:
        history = comfy_server.run(prompt)
        assert history["outputs"]["train"]["images"], "the loss curve is previewed on the node"
        assert all(p.exists() for p in written)
        tensors, metadata = lora_tensors(written[0])
        assert metadata["ss_num_train_images"] == "2" and metadata["ss_steps"] == "1"

        # same node ids and inputs as above, so ComfyUI reuses the loaded model and CLIP
        load = {
            "model": prompt["model"],
            "clip": prompt["clip"],
            "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["model", 0], "lora_name": written[0].name, "strength_model": 1.0}},
            "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "TOK"}},
            "sample": {"class_type": "KSampler", "inputs": {
                "model": ["lora", 0], "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["latent", 0],
                "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
            "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "lora"}},
        }
        log_start = len(comfy_server.log_path.read_text(errors="replace"))
        comfy_server.run(load)
        comfy_server._log.flush()
        assert "lora key not loaded" not in comfy_server.log_path.read_text(errors="replace")[log_start:]
    finally:
        for path in written:
            path.unlink(missing_ok=True)


def test_dataset_name_input_overrides_the_dropdown_and_repeat_folders_weigh(comfy_libs, clip_vae, folders):
    """FluxQPrepareDataset's output (a folder name) feeds `dataset_name`; kohya's `3_red/` counts
    its image three times (kohya's ss_num_train_images counts repeats too)."""
    clip, vae = clip_vae
    inputs, loras = folders
    (inputs / "prepared" / "3_red").mkdir(parents=True)
    pattern_image("red").save(inputs / "prepared" / "3_red" / "red.png")
    pattern_image("blue").save(inputs / "prepared" / "blue.png")
    node = node_class_for_prompt(comfy_libs.train.FluxQTrainLoRA, "7")
    with torch.inference_mode():
        out = node.execute(dataset_name=["prepared"], **node_args(narrow_flux(), clip, vae, dataset="[none]", steps=1))
    _, metadata = lora_tensors(loras / out.result[1])
    assert metadata["ss_num_train_images"] == "4"


def server_dataset(comfy_server, folder="fluxq_squares") -> str:
    path = comfy_server.input_dir / folder
    if not path.exists():
        path.mkdir()
        for name in ("red", "stripes"):
            pattern_image(name).save(path / f"{name}.png")
            (path / f"{name}.txt").write_text(f"a {name} square")
    return folder


def server_training_graph(comfy_server, lora_name: str, **overrides) -> dict:
    """Text, VAE, the tiny GGUF and FluxQTrainLoRA (node "train") on a dataset folder, 64 px, fast settings."""
    settings = {k: v[0] for k, v in node_args(None, None, None, dataset=server_dataset(comfy_server), steps=1,
                                               gradient_checkpointing=False, lora_name=lora_name,
                                               **overrides).items() if k not in ("model", "vae", "clip")}
    return {
        "model": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY_DEV_Q8, "dequant_dtype": "auto"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_CLIP_L, "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_VAE}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "TOK, a red square"}},
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": {
            "preset": "custom", "steps": 1, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
            "shift_mode": "auto", "shift": 1.0, "width": 64, "height": 64, "denoise": 1.0}},
        "train": {"class_type": "FluxQTrainLoRA", "inputs": {
            "model": ["model", 0], "vae": ["vae", 0], "clip": ["clip", 0], **settings}},
    }


def saved_sample(node_id: str, model_ref) -> dict:
    """FluxQSampler (seed 3) on `model_ref`, saved as a latent under `node_id`."""
    return {f"{node_id}_sample": {"class_type": "FluxQSampler", "inputs": {
                "model": model_ref, "positive": ["pos", 0], "settings": ["settings", 0], "seed": 3}},
            node_id: {"class_type": "SaveLatent", "inputs": {"samples": [f"{node_id}_sample", 0],
                                                             "filename_prefix": node_id}}}


@contextlib.contextmanager
def removed_afterwards(folder, name: str):
    """ComfyUI's default loras folder is the harness's own: delete every file a run named `name` wrote."""
    try:
        yield
    finally:
        for path in folder.glob(f"{name}*"):
            if path.name == f"{name}.safetensors" or path.name.startswith((f"{name}.", f"{name}_step")):
                path.unlink(missing_ok=True)


@pytest.mark.server
def test_trained_lora_is_named_by_its_file_so_remove_reapply_and_grid_treat_it_as_that_file(comfy_server, models_dir):
    import uuid

    from fluxq_testing import saved_latent

    name = f"named_{uuid.uuid4().hex[:8]}"
    file_name = f"{name}.safetensors"
    prompt = server_training_graph(comfy_server, name)
    with removed_afterwards(models_dir / "loras", name):
        comfy_server.run(prompt)
        # same node ids and inputs: ComfyUI reuses the trained MODEL from its cache, and the file now exists
        prompt.update({
            **saved_sample("base", ["model", 0]),
            **saved_sample("trained", ["train", 0]),
            "remove": {"class_type": "FluxQRemoveLoRA", "inputs": {"model": ["train", 0], "lora_name": file_name}},
            **saved_sample("removed", ["remove", 0]),
            "again": {"class_type": "FluxQApplyLoRA", "inputs": {
                "model": ["train", 0], "lora_name": file_name, "strength_model": 1.0, "strength_clip": 1.0}},
            **saved_sample("reapplied", ["again", 0]),
        })
        history = comfy_server.run(prompt)
    latent = {key: saved_latent(comfy_server, history, key) for key in ("base", "trained", "removed", "reapplied")}
    assert not torch.equal(latent["trained"], latent["base"]), "the trained LoRA changes the render"
    assert torch.equal(latent["removed"], latent["base"]), "removing the file's name removes the trained LoRA"
    assert torch.equal(latent["reapplied"], latent["trained"]), "re-applying the saved file replaces it, not doubles it"


# --- the trainer's additions (issue 14): EMA, dropout, samples, latent cache, prior preservation ---


@pytest.fixture
def work_folders(comfy_libs, folders, tmp_path):
    """`folders` plus a fresh output/ and user/ (where the latent cache lives)."""
    fp = comfy_libs.folder_paths
    old_output, old_user = fp.get_output_directory(), fp.get_user_directory()
    output, user = tmp_path / "output", tmp_path / "user"
    output.mkdir()
    user.mkdir()
    fp.set_output_directory(str(output))
    fp.set_user_directory(str(user))
    yield (*folders, output, user)
    fp.set_output_directory(old_output)
    fp.set_user_directory(old_user)


def render_settings(pack, steps=2):
    """FLUX_SAMPLER_SETTINGS for cheap renders (the size is the trainer's resolution)."""
    sampling = importlib.import_module(f"{pack.__name__}.nodes.sampling")
    return sampling.FluxSamplerSettings(preset="custom", steps=steps, guidance=3.5, sampler_name="euler",
                                        scheduler="simple", shift_mode="auto", shift=1.0, width=64, height=64,
                                        denoise=1.0)


def factors_of(path):
    tensors, _ = lora_tensors(path)
    return {k: v for k, v in tensors.items() if k.endswith(".weight")}


def test_ema_file_is_the_closed_form_average_of_the_recorded_raw_weights_and_resume_continues_it(
        comfy_libs, clip_vae, folders):
    from lora_ops.ema import closed_form_ema
    from lora_ops.lora_checkpoint import load_train_state
    from lora_ops.lora_formats import kohya_name

    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red", "stripes"])
    decay = 0.8
    settings = dict(steps=5, ema_decay=decay, save_every=1, keep_last=0, learning_rate=1e-2)
    train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="ema", **settings))

    def raw(step_file):  # the raw weights this step recorded, by the LoRA file's key names
        tensors = load_train_state(str(loras / step_file))[0].tensors
        return {f"{kohya_name(k[4:].rsplit('.', 1)[0])}.lora_{k.rsplit('.', 1)[1]}.weight": v
                for k, v in tensors.items()}

    steps = [f"ema_step{s:06d}.safetensors" for s in range(1, 5)] + ["ema.safetensors"]
    recorded = [raw(f) for f in steps]
    first_average, final = factors_of(loras / steps[0]), factors_of(loras / "ema.safetensors")
    assert final.keys() == recorded[-1].keys()
    moved = 0
    for key in final:
        expected = closed_form_ema(first_average[key], [r[key] for r in recorded[1:]], decay)
        torch.testing.assert_close(final[key].double(), expected, rtol=1e-5, atol=1e-7)
        moved += not torch.allclose(final[key], recorded[-1][key])
    assert moved, "the file holds the average, not the raw weights"

    # resumed at step 3, the run continues the raw weights and the average: the same file
    comfy_libs.folder_paths.filename_list_cache.clear()
    train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="ema_resumed", resume="ema_step000003.safetensors",
                                **settings))
    resumed = factors_of(loras / "ema_resumed.safetensors")
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], rtol=1e-5, atol=1e-6)


def test_lora_dropout_changes_the_training_and_is_off_by_default(comfy_libs, clip_vae, folders):
    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red", "stripes"])
    for name, dropout in (("plain", 0.0), ("default", None), ("dropped", 0.5)):
        extra = {} if dropout is None else {"lora_dropout": dropout}
        train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name=name, steps=2, **extra))
    plain, default, dropped = (factors_of(loras / f"{n}.safetensors") for n in ("plain", "default", "dropped"))
    assert all(torch.equal(plain[k], default[k]) for k in plain)
    assert any(not torch.allclose(plain[k], dropped[k]) for k in plain if "lora_up" in k)


def test_during_the_steps_comfyui_holds_the_transformer_alone(comfy_libs, clip_vae, folders):
    """The text encoder and the VAE encode everything before the first step, then leave: in every
    step's forward ComfyUI's loaded models are the transformer alone (FLUX.2 [dev]'s 24 B encoder
    must not share the card with its 32 B transformer). ComfyUI tracks the CPU's models too."""
    import comfy.model_management

    def loaded_models():
        return [loaded.model for loaded in comfy.model_management.current_loaded_models]

    clip, vae = clip_vae
    inputs, _ = folders
    write_dataset(inputs, ["red", "blue"])
    model = narrow_flux()
    with torch.inference_mode():
        clip.encode_from_tokens(clip.tokenize("an encoder loaded before training"))
    assert clip.patcher in loaded_models()  # what has to leave
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: seen.append(loaded_models()))
    try:
        train(comfy_libs, node_args(model, clip, vae, lora_name="alone", steps=2))
    finally:
        hook.remove()
    assert len(seen) == 2 and all(loaded == [model] for loaded in seen), seen


def test_flux2_blocks_are_recomputed_in_backward_and_train_as_when_kept(comfy_libs, folders, models_dir, monkeypatch):
    """gradient_checkpointing wraps each double and single block of a FLUX.2 model (klein; FLUX.2
    [dev] has the same blocks) in activation checkpointing, once per block in a step's forward, and
    the LoRA comes out as with the activations kept."""
    if not comfyui_is_0_33():
        pytest.skip("ComfyUI 0.3.75 cannot load klein (the refusal: test_flux_family_server.py)")
    glue = comfy_libs.glue
    clip = glue.load_text_encoders(str(models_dir / "text_encoders" / TINY_CLIP_L), None, "flux1")
    vae = glue.load_vae(str(models_dir / "vae" / "fluxq-tiny-flux2-ae.safetensors"))
    inputs, loras = folders
    write_dataset(inputs, ["stripes"])
    checkpointed = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda run, *args, **kwargs: checkpointed.append(run) or checkpoint(run, *args, **kwargs))
    for name, on in (("kept", False), ("recomputed", True)):
        model = glue.load_diffusion_model(str(models_dir / "diffusion_models" / "fluxq-tiny-flux2-klein-4b-Q8_0.gguf"))
        train(comfy_libs, node_args(model, clip, vae, lora_name=name, steps=1, gradient_checkpointing=on))
    blocks = model.model.diffusion_model
    assert len(checkpointed) == len(blocks.double_blocks) + len(blocks.single_blocks)
    kept, recomputed = (factors_of(loras / f"{name}.safetensors") for name in ("kept", "recomputed"))
    assert kept.keys() == recomputed.keys() and any(kept[k].abs().max() > 0 for k in kept if "lora_up" in k)
    for key in kept:
        torch.testing.assert_close(recomputed[key], kept[key], rtol=1e-5, atol=1e-7)


def test_samples_appear_at_exactly_the_configured_steps_on_the_node_and_in_output(comfy_libs, clip_vae, work_folders,
                                                                                   pack):
    import comfy.utils

    clip, vae = clip_vae
    inputs, loras, output, _ = work_folders
    write_dataset(inputs, ["red", "blue"])
    previews = []
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None, **_: previews.append(value) if preview is not None else None)
    try:
        args = node_args(narrow_flux(), clip, vae, lora_name="sampled", steps=5, sample_every=2,
                         sample_prompts="TOK, a red square\n\nTOK, a blue square\n", sample_seed=7)
        out = train(comfy_libs, {**args, "sample_settings": [render_settings(pack)]})
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    expected = [f"sampled_step{step:06d}_{i}.png" for step in (2, 4) for i in (0, 1)]
    assert sorted(p.name for p in (output / "sampled_samples").iterdir()) == expected
    assert previews == [2, 2, 4, 4], "each sample is shown on the node as it is made"
    shown = out.ui["images"]
    assert [i["filename"] for i in shown[1:]] == expected and shown[1]["type"] == "output"
    with Image.open(output / "sampled_samples" / expected[0]) as image:
        assert image.size == (64, 64)


def test_a_second_run_reuses_the_latent_cache_and_a_touched_image_is_encoded_again(comfy_libs, clip_vae, work_folders):
    clip, vae = clip_vae
    inputs, loras, _, user = work_folders
    write_dataset(inputs, ["red", "blue", "stripes"])
    encoded = []
    original_encode = vae.encode

    def counted(pixels):
        encoded.append(pixels.shape)
        return original_encode(pixels)

    vae.encode = counted  # counts the real VAE's calls
    try:
        runs = []
        for name in ("first", "second", "touched"):
            if name == "touched":
                image = pattern_image("red")
                image.putpixel((5, 5), (0, 0, 0))
                image.save(inputs / "set" / "red.png")
            before = len(encoded)
            train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name=name, steps=1, cache_latents_to_disk=True))
            runs.append(len(encoded) - before)
    finally:
        del vae.encode
    assert runs == [3, 0, 1], f"VAE encodes per run: {runs}"
    assert len(list((user / "fluxq_cache" / "latents").iterdir())) == 4
    first, second = factors_of(loras / "first.safetensors"), factors_of(loras / "second.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first), "cached latents train exactly as fresh ones"


def test_prior_preservation_generates_class_images_once_and_a_later_run_reuses_them(comfy_libs, clip_vae, work_folders,
                                                                                     pack, caplog):
    clip, vae = clip_vae
    inputs, loras, _, user = work_folders
    write_dataset(inputs, ["red", "stripes"])
    args = dict(class_prompt="a square", class_image_count=2, prior_loss_weight=0.5, steps=2)
    with caplog.at_level(logging.INFO, logger="fluxq"):
        for name in ("prior_a", "prior_b"):
            train(comfy_libs, {**node_args(narrow_flux(), clip, vae, lora_name=name, **args),
                               "sample_settings": [render_settings(pack, steps=1)]})
    (folder,) = (user / "fluxq_cache" / "class_images").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png"]
    assert "2 class image(s) generated, 0 reused" in caplog.text
    assert "0 class image(s) generated, 2 reused" in caplog.text
    a, b = factors_of(loras / "prior_a.safetensors"), factors_of(loras / "prior_b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # (that the class term counts: tests/unit/test_flow_match.py)

    # class images from a folder under input/, captioned with the class prompt
    write_dataset(inputs, ["green", "blue"], folder="classes", captions=False)
    train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="prior_folder", class_prompt="a square",
                                class_images="classes", steps=1))
    with pytest.raises(ValueError, match="needs a class_prompt"):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="x", class_images="classes", steps=1))
    with pytest.raises(ValueError, match="outside the input folder"):
        train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="x", class_prompt="a square",
                                    class_images="../loras", steps=1))


def test_after_training_on_one_flat_colour_samples_at_strength_1_are_closer_to_its_latent(comfy_libs, clip_vae,
                                                                                          folders, pack):
    """A seed-fixed effect through the sampler: the trained LoRA pulls renders towards the colour."""
    from lora_ops import dataset as ds

    sampling = importlib.import_module(f"{pack.__name__}.nodes.sampling")
    clip, vae = clip_vae
    inputs, _ = folders
    write_dataset(inputs, ["red"])
    base = narrow_flux()
    out = train(comfy_libs, node_args(base, clip, vae, rank=8, alpha=8.0, steps=40, learning_rate=1e-2,
                                      caption_dropout=0.0, gradient_checkpointing=False,
                                      timestep_sampling="uniform"))
    trained = out.result[0]
    settings = render_settings(pack, steps=4)
    with torch.inference_mode():
        target = vae.encode(ds.image_to_tensor(pattern_image("red"))[None]).float()
        context, pooled = clip.encode_from_tokens(clip.tokenize("TOK, a red square"), return_pooled=True)

        def distance(model) -> float:  # strength 0 is the model without the LoRA, bit for bit
            total = 0.0
            for seed in (0, 1):
                latent = sampling.empty_latent(settings)
                patched, positive = sampling.prepare(model, [[context, {"pooled_output": pooled}]], settings, latent)
                sample = sampling.sample_latent(patched, positive, settings, seed, latent, None)["samples"]
                total += torch.mean((sample.float() - target) ** 2).item()
            return total / 2

        at_0, at_1 = distance(base), distance(trained)
    # measured on CPU (ComfyUI 0.3.75): 20.56 without the LoRA, 10.06 with it
    assert at_1 < 0.7 * at_0, f"latent distance to the colour: {at_1:.4f} with the LoRA vs {at_0:.4f} without"


def test_flux1_inputs_from_the_models_extra_conds_train_bit_identically_to_the_hand_built_ones(
        comfy_libs, clip_vae, folders, pack, monkeypatch):
    """The trainer asks the model for its inputs as the sampler does (extra_conds); for FLUX.1 that
    is exactly what it built by hand before (context, CLIP-L pooled as y, guidance 1.0): the same
    loss curve and LoRA bit for bit, with batches, caption dropout and checkpointed blocks."""
    training = importlib.import_module(f"{pack.__name__}.nodes.training")
    runtime = importlib.import_module(f"{pack.__name__}.lora_ops.lora_runtime")
    clip, vae = clip_vae
    inputs, loras = folders
    write_dataset(inputs, ["red", "green", "stripes"])
    args = dict(rank=4, alpha=4.0, steps=3, learning_rate=1e-2, batch_size=2, caption_dropout=0.5)

    def hand_built(run, stack, device):  # the trainer's FLUX.1 predictor before the family path
        model = run.diffusion_model
        dtype = run.model.model.manual_cast_dtype or run.model.model.get_dtype()
        options = {"patches_replace": {"dit": run._checkpointed_blocks(stack)}}

        def predict(x_t, t, context, pooled, reference):
            with runtime.activate(stack, root=model):
                return model(x_t.to(dtype), t.float(), context=context.to(dtype), y=pooled.to(dtype),
                             guidance=torch.ones_like(t), transformer_options=dict(options))

        return predict

    train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="family", **args))
    monkeypatch.setattr(training.TrainingRun, "_predictor", hand_built)
    train(comfy_libs, node_args(narrow_flux(), clip, vae, lora_name="by_hand", **args))
    from lora_ops.lora_checkpoint import load_train_state

    ours, reference = (load_train_state(str(loras / f"{n}.safetensors"))[0].loss_history for n in ("family", "by_hand"))
    assert len(ours) == 3 and ours == reference
    a, b = lora_tensors(loras / "family.safetensors")[0], lora_tensors(loras / "by_hand.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_edit_pairs_control_latents_enter_as_reference_tokens_and_only_target_tokens_come_back(comfy_libs):
    """The trainer's model inputs carry a control latent the way ComfyUI's sampler carries
    ReferenceLatent's (the model's extra_conds maps it into `ref_latents`), the FLUX forward reads
    it, and returns the target's tokens alone (it crops its output to the noised image's tokens,
    which is what keeps the loss off the reference tokens), whatever the reference's size."""
    glue = comfy_libs.glue
    model = narrow_flux()
    diffusion_model = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    x, context, pooled = (torch.randn(*s, generator=gen) for s in ((2, 16, 8, 8), (2, 5, 768), (2, 768)))
    t = torch.tensor([0.3, 0.7])
    control, other = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 6, 10, generator=gen)
    assert glue.takes_reference_latents(model)

    def predict(reference):
        inputs = glue.model_inputs(model, x, context, pooled, 1.0, torch.float32, reference)
        if reference is not None:
            (given,) = inputs["ref_latents"]
            torch.testing.assert_close(given, model.model.process_latent_in(reference))
        with torch.no_grad():
            return diffusion_model(x, t, context=inputs.pop("c_crossattn"), **inputs)

    plain, with_control, with_other = predict(None), predict(control), predict(other)
    assert plain.shape == with_control.shape == with_other.shape == x.shape
    assert (with_control - plain).abs().max() > 1e-4 and (with_control - with_other).abs().max() > 1e-4
    # each sample's own reference: the first row's prediction ignores the second row's control
    mixed = predict(torch.stack([control[0], control[0] * 0 + 3.0]))
    torch.testing.assert_close(mixed[0], with_control[0])
    # Chroma's forward would swallow ref_latents in its **kwargs unused: edit pairs are refused there
    import comfy.ldm.chroma.model

    chroma = type("Patcher", (), {"model": type("Base", (), {"diffusion_model": comfy.ldm.chroma.model.Chroma.__new__(
        comfy.ldm.chroma.model.Chroma)})})
    assert not glue.takes_reference_latents(chroma)


def test_edit_pairs_cache_each_control_by_its_pixels_and_a_changed_control_changes_the_training(
        comfy_libs, clip_vae, work_folders, pack):
    """Edit pairs with the latent cache: a rerun encodes nothing and trains the same LoRA; a changed
    control image is encoded again (alone) and changes what is trained (its reference tokens are in
    the loss's prediction); samples during training edit the first pair's control."""
    clip, vae = clip_vae
    inputs, loras, output, _ = work_folders
    write_dataset(inputs, ["red", "green"])
    (inputs / "set" / "control").mkdir()
    for target, control in (("red", "blue"), ("green", "stripes")):
        pattern_image(control).save(inputs / "set" / "control" / f"{target}.png")
    encoded = []
    original_encode = vae.encode

    def counted(pixels):
        encoded.append(pixels.shape)
        return original_encode(pixels)

    vae.encode = counted
    try:
        runs = []
        for name in ("first", "again", "changed"):
            if name == "changed":  # pixels no image of the set had
                image = pattern_image("blue")
                image.paste((250, 250, 250), (0, 0, 32, 32))
                image.save(inputs / "set" / "control" / "red.png")
            before = len(encoded)
            train(comfy_libs, {**node_args(narrow_flux(), clip, vae, lora_name=name, steps=2, batch_size=2,
                                           learning_rate=1e-2, cache_latents_to_disk=True, sample_every=2,
                                           sample_prompts="swap"),
                               "sample_settings": [render_settings(pack, steps=1)]})
            runs.append(len(encoded) - before)
    finally:
        del vae.encode
    assert runs == [4, 0, 1], f"VAE encodes per run (2 targets + 2 controls): {runs}"
    first, again, changed = (factors_of(loras / f"{n}.safetensors") for n in ("first", "again", "changed"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], changed[k]) for k in first), "the control image changed nothing"
    assert (output / "first_samples" / "first_step000002_0.png").is_file()
