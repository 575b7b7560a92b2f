"""What changed between ComfyUI 0.3.75 and 0.33 that touches a quantized-model pack, checked on
whichever ComfyUI the suite runs on (both in CI): core's save path, LoRA on quantized text
encoders, re-creating a model from ``cached_patcher_init``, pinning of memory-mapped weights.
"""

import contextlib
import inspect

import gguf
import pytest
import torch
from safetensors.numpy import load_file

from fluxq_testing import TINY, dequantized_state_dict, sample, tiny_gguf_model, tiny_gguf_path

RANK = 4


@pytest.fixture(autouse=True)
def models_released_afterwards():
    """These tests build several full tiny models (2 GB each in float32); ComfyUI keeps the ones it
    loaded until memory runs short, so they are let go after each test."""
    yield
    import gc

    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()


def kohya_lora(modules: dict[str, tuple[int, int]], prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA on ``modules`` (dotted path -> (in, out)), alpha 2 at rank 4 (scale 0.5)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (fan_in, fan_out) in modules.items():
        name = prefix + path.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = torch.randn(RANK, fan_in, generator=g) / fan_in ** 0.5
        sd[f"{name}.lora_up.weight"] = 0.5 * torch.randn(fan_out, RANK, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    return sd


def test_core_save_writes_a_float_checkpoint_of_a_gguf_model(pack, models_dir, tmp_path):
    """What core ModelSave/CheckpointSave run (comfy.sd.save_checkpoint) on a GGUF model with a
    core LoRA: the file holds the dequantized, patched weights, and core's own loader reads it back."""
    import comfy.sd

    ours = tiny_gguf_model(models_dir, "Q8_0")
    lora = kohya_lora({"double_blocks.0.img_attn.qkv": (3072, 9216), "single_blocks.0.linear2": (15360, 3072)},
                      "lora_unet_", seed=3)
    patched, _ = comfy.sd.load_lora_for_models(ours, None, lora, 0.8, 0)
    path = tmp_path / "saved.safetensors"
    comfy.sd.save_checkpoint(str(path), patched)

    saved = comfy.sd.load_diffusion_model(str(path))
    weight = saved.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    assert weight.is_floating_point() and weight.shape == (9216, 3072)
    reference, _ = comfy.sd.load_lora_for_models(
        comfy.sd.load_diffusion_model_state_dict(dequantized_state_dict(tiny_gguf_path(models_dir, "Q8_0"))),
        None, lora, 0.8, 0)
    torch.testing.assert_close(sample(saved), sample(reference), rtol=2e-4, atol=2e-4)
    assert ours.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8  # still quantized


def quantized_clip_l(models_dir, scratch_models):
    from comfyui_flux_qlora.lora_ops.gguf_write import write_gguf

    weights = load_file(str(models_dir / "text_encoders" / TINY["clip_l"]))
    path = scratch_models / "text_encoders" / "clip_l-compat-Q8_0.gguf"
    if not path.exists():
        write_gguf(path, weights, lambda name, array: gguf.GGMLQuantizationType.Q8_0
                   if array.ndim == 2 and array.shape[1] % 32 == 0 else gguf.GGMLQuantizationType.F32, arch="clip")
    return path


def encode(clip):
    return clip.encode_from_tokens(clip.tokenize("a tiny random test"), return_pooled=True)


def test_lora_on_a_quantized_clip_matches_core_on_the_dequantized_copy(pack, models_dir, scratch_models):
    import comfy.sd
    from comfyui_flux_qlora.nodes.comfy_glue import load_text_encoders

    path = quantized_clip_l(models_dir, scratch_models)
    lora = kohya_lora({"text_model.encoder.layers.0.mlp.fc1": (768, 3072),
                       "text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}, "lora_te1_", seed=4)
    ours = load_text_encoders(str(path), None)
    reference = comfy.sd.load_text_encoder_state_dicts([dequantized_state_dict(path)],
                                                       clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    _, ours_lora = comfy.sd.load_lora_for_models(None, ours, lora, 0, 0.7)
    _, reference_lora = comfy.sd.load_lora_for_models(None, reference, lora, 0, 0.7)

    (cond, pooled), (ref_cond, ref_pooled) = encode(ours_lora), encode(reference_lora)
    (base_cond, _) = encode(ours)
    assert (cond - base_cond).abs().mean() > 1e-2  # the LoRA changed the encoding
    # core keeps text encoders in fp16 on CPU, ours dequantizes straight to the compute dtype
    for value, expected in ((cond, ref_cond), (pooled, ref_pooled)):
        torch.testing.assert_close(value, expected, rtol=1e-2, atol=5e-3)
        assert (value - expected).abs().mean() < 1e-3
    fc1 = ours_lora.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1
    assert fc1.weight.dtype == torch.uint8  # the patch runs after dequantization, never merged


def test_models_can_be_recreated_from_cached_patcher_init(pack, models_dir, scratch_models):
    """ComfyUI 0.33's ``clone(disable_dynamic=True)`` (hook conditioning, device selection) and
    multi-GPU copies re-create a model from ``cached_patcher_init``; the pack's loaders set it."""
    from comfyui_flux_qlora.nodes.comfy_glue import load_flux_gguf, load_text_encoders

    model = load_flux_gguf(str(tiny_gguf_path(models_dir, "Q8_0")))
    clip = load_text_encoders(str(quantized_clip_l(models_dir, scratch_models)), None)
    for patcher in (model, clip.patcher):
        factory, args = patcher.cached_patcher_init[:2]
        fresh = factory(*args, disable_dynamic=True)
        assert type(fresh) is type(patcher) and fresh.model is not patcher.model
        assert fresh.model.state_dict().keys() == patcher.model.state_dict().keys()
        assert patcher.clone().cached_patcher_init == patcher.cached_patcher_init
    if "force_deepcopy" in inspect.signature(type(model).clone).parameters:
        # ComfyUI 0.33's own use of the factory
        copy = model.clone(force_deepcopy=True)
        assert copy.model is not model.model
        assert torch.equal(sample(copy), sample(model))
    if "disable_dynamic" in inspect.signature(type(model).clone).parameters:
        assert model.clone(disable_dynamic=True).model is model.model  # never dynamic: a plain clone


def test_memory_mapped_quantized_weights_are_never_pinned(pack, models_dir, monkeypatch):
    import comfy.model_management

    model = tiny_gguf_model(models_dir, "Q8_0")
    pinned = []
    monkeypatch.setattr(comfy.model_management, "pin_memory", lambda tensor: pinned.append(tensor) or False)
    model.pin_weight_to_device("diffusion_model.double_blocks.0.img_attn.qkv.weight")
    assert pinned == []
    model.pin_weight_to_device("diffusion_model.double_blocks.0.img_attn.qkv.bias")
    assert len(pinned) == 1 and pinned[0].is_floating_point()


@pytest.mark.parametrize("failing", [False, True])
def test_training_mode_is_set_only_inside_and_always_restored(pack, failing):
    import comfy.model_management
    from comfyui_flux_qlora.nodes.comfy_glue import training_mode

    before = getattr(comfy.model_management, "in_training", None)
    seen = []
    with pytest.raises(RuntimeError) if failing else contextlib.nullcontext():
        with training_mode():
            seen.append(getattr(comfy.model_management, "in_training", None))
            if failing:
                raise RuntimeError("step failed")
    assert getattr(comfy.model_management, "in_training", None) == before
    # ComfyUI 0.33 takes the differentiable RoPE only under this flag; 0.3.75 has no flag
    assert seen == [None if before is None else True]
