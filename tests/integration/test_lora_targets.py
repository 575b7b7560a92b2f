"""Every entry of ComfyUI's FLUX LoRA key map, and every adapter kind, against core's merge.

The oracle is ComfyUI's own `comfy.lora.calculate_weight` with the target exactly as its key map
gives it (row slice, transform function): for LoRA the update does not depend on the weight, so
core merges onto zeros; for DoRA it merges onto the layer's real (dequantized) weight. A new
transform in a future ComfyUI's key map either matches here or makes the runtime path refuse the
file: never a silently wrong update.
"""

import zlib

import pytest
import torch

from fluxq_testing import runtime_update, tiny_gguf_model, tiny_gguf_path

RANK = 2
HIDDEN = 128


@pytest.fixture(scope="module")
def model(pack):
    """A FLUX.1-dev-architecture ModelPatcher of hidden 128 (one head), random weights: ComfyUI's key
    map for it has every kind of entry the full model's has, at a fraction of the cost."""
    import comfy.model_patcher
    import comfy.supported_models
    from make_tiny_models import flux_params

    config = comfy.supported_models.Flux(flux_params(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768,
        hidden_size=HIDDEN, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
    ))
    config.set_inference_dtype(torch.float32, None)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        base = config.get_model({})
        base.diffusion_model.load_state_dict({
            name: torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5
            for name, t in base.diffusion_model.state_dict().items()})
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _split(target):
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1], target[2] if len(target) > 2 else None


def _linear_entries(model):
    import comfy.lora

    diffusion_model = model.model.diffusion_model
    model_keys = model.model.state_dict().keys()
    entries = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        key, _, _ = _split(target)
        if key not in model_keys or not key.endswith(".weight"):
            continue
        module = diffusion_model.get_submodule(key[len("diffusion_model."):-len(".weight")])
        if isinstance(module, torch.nn.Linear):
            entries[name] = target
    return entries


def _core_update(target, patch, weight, strength=1.0):
    """What core's LoraLoader adds to `weight` for this key-map target (calculate_weight as ModelPatcher calls it)."""
    import comfy.lora

    key, offset, function = _split(target)
    merged = comfy.lora.calculate_weight([(strength, patch, 1.0, offset, function)], weight.clone(), key)
    return merged - weight


def _factors(target, in_features, rows, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, in_features, generator=g) / in_features ** 0.5, torch.randn(rows, RANK, generator=g)


def test_every_linear_entry_of_the_key_map_matches_core(model):
    import comfy.lora
    from comfyui_flux_qlora.nodes.comfy_glue import runtime_adapters

    entries = _linear_entries(model)
    transformed = [n for n, t in entries.items() if _split(t)[2] is not None]
    sliced = [n for n, t in entries.items() if _split(t)[1] is not None]
    # the tiny FLUX has every kind of target: diffusers names with row slices and the norm_out row swap
    assert "transformer.norm_out.linear" in transformed and "transformer.transformer_blocks.0.attn.to_k" in sliced
    assert len(entries) > 60

    expected_by_target = {}
    for index, (name, target) in enumerate(sorted(entries.items())):
        key, offset, _ = _split(target)
        module_path = key[len("diffusion_model."):-len(".weight")]
        module = model.model.diffusion_model.get_submodule(module_path)
        rows = offset[2] if offset is not None else module.out_features
        down, up = _factors(target, module.in_features, rows, seed=zlib.crc32(repr(_split(target)[:2]).encode()))
        lora_sd = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                   f"{name}.alpha": torch.tensor(RANK * 1.5)}
        adapters, matched, sources = runtime_adapters(model, lora_sd, "walk.safetensors")
        assert list(adapters) == [module_path] and matched == set(lora_sd) and sources == {"alpha": 1}, name

        weight = torch.zeros(module.out_features, module.in_features)
        target_id = repr(target)
        if target_id not in expected_by_target:
            (patch,) = comfy.lora.load_lora(lora_sd, {name: target}, log_missing=False).values()
            expected_by_target[target_id] = _core_update(target, patch, weight)
        expected = expected_by_target[target_id]
        assert expected.abs().max() > 0
        probe = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(index))
        dense, separate = runtime_update(model, adapters[module_path], module_path, weight, probe)
        torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(separate, probe @ expected.T, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_a_transform_that_is_not_a_row_reordering_is_refused(model, monkeypatch):
    import comfy.lora
    from comfyui_flux_qlora.nodes.comfy_glue import LoraMatchError, runtime_adapters

    def negate_rows(weight):
        return -weight

    original = comfy.lora.model_lora_keys_unet

    def with_new_transform(m, key_map):
        key_map = original(m, key_map)
        key_map["transformer.norm_out.linear"] = ("diffusion_model.final_layer.adaLN_modulation.1.weight", None,
                                                  negate_rows)
        return key_map

    monkeypatch.setattr(comfy.lora, "model_lora_keys_unet", with_new_transform)
    down, up = _factors(None, HIDDEN, 2 * HIDDEN, seed=1)
    lora_sd = {"transformer.norm_out.linear.lora_A.weight": down, "transformer.norm_out.linear.lora_B.weight": up}
    with pytest.raises(LoraMatchError, match="negate_rows, which is not a reordering of rows"):
        runtime_adapters(model, lora_sd, "future.safetensors")


# --- LoKr, LoHa and DoRA (LyCORIS / kohya names) ----------------------------------------------


def _lycoris_file(h=HIDDEN):
    """One file with each adapter kind the runtime path applies besides plain LoRA, for hidden size h."""
    g = torch.Generator().manual_seed(7)

    def rnd(*shape, scale=0.05):
        return scale * torch.randn(*shape, generator=g)

    qkv, lin2 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear2"
    mlp, proj, mod = "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_txt_attn_proj", \
        "lora_unet_double_blocks_0_img_mod_lin"
    add_k = "transformer.transformer_blocks.0.attn.add_k_proj"
    return {
        # LoKr, factorised w2: (3h, h) = kron((4, 4), (3h/4, 2) @ (2, h/4)), alpha 3 / 2
        f"{qkv}.lokr_w1": rnd(4, 4, scale=1.0), f"{qkv}.lokr_w2_a": rnd(3 * h // 4, 2),
        f"{qkv}.lokr_w2_b": rnd(2, h // 4), f"{qkv}.alpha": torch.tensor(3.0),
        # LoKr, both matrices whole (scale 1 whatever alpha says), with DoRA on the input axis
        f"{lin2}.lokr_w1": rnd(4, 4, scale=1.0), f"{lin2}.lokr_w2": rnd(h // 4, 5 * h // 4),
        f"{lin2}.dora_scale": 1 + rnd(1, 5 * h, scale=0.3),
        # LoHa, alpha 2 over rank 4
        f"{mlp}.hada_w1_a": rnd(4 * h, 4, scale=0.5), f"{mlp}.hada_w1_b": rnd(4, h, scale=0.5),
        f"{mlp}.hada_w2_a": rnd(4 * h, 4, scale=0.5), f"{mlp}.hada_w2_b": rnd(4, h, scale=0.5),
        f"{mlp}.alpha": torch.tensor(2.0),
        # DoRA (kohya/LyCORIS dora_scale) on the input axis, on the output axis, and on a fused-qkv row slice
        f"{proj}.lora_down.weight": rnd(4, h), f"{proj}.lora_up.weight": rnd(h, 4),
        f"{proj}.alpha": torch.tensor(2.0), f"{proj}.dora_scale": 1 + rnd(1, h, scale=0.3),
        f"{mod}.lora_down.weight": rnd(4, h), f"{mod}.lora_up.weight": rnd(6 * h, 4),
        f"{mod}.dora_scale": 0.5 + rnd(6 * h, 1, scale=0.1),
        f"{add_k}.lora_A.weight": rnd(4, h), f"{add_k}.lora_B.weight": rnd(h, 4),
        f"{add_k}.dora_scale": 0.5 + rnd(h, 1, scale=0.1),
    }


LYCORIS_MODULES = {
    "double_blocks.0.img_attn.qkv": "KroneckerAdapter", "single_blocks.0.linear2": "DoRAAdapter",
    "double_blocks.0.img_mlp.0": "LowRankAdapter", "double_blocks.0.txt_attn.proj": "DoRAAdapter",
    "double_blocks.0.img_mod.lin": "DoRAAdapter", "double_blocks.0.txt_attn.qkv": "DoRAAdapter",
}


@pytest.mark.parametrize("strength", [1.0, 0.5, -0.7])
def test_lokr_loha_and_dora_updates_match_core_per_layer(model, strength):
    import comfy.lora
    from comfyui_flux_qlora.nodes.comfy_glue import layer_base_weight, runtime_adapters

    lora_sd = _lycoris_file()
    adapters, matched, sources = runtime_adapters(model, lora_sd, "lycoris.safetensors")
    assert {p: type(a[0]).__name__ for p, a in adapters.items()} == LYCORIS_MODULES
    assert matched == set(lora_sd) and sources == {"alpha": 3, "none": 2, "lokr_full": 1}

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    core_patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    for target, patch in core_patches.items():
        key, _, _ = _split(target)
        module_path = key[len("diffusion_model."):-len(".weight")]
        module = model.model.diffusion_model.get_submodule(module_path)
        weight = layer_base_weight(module, torch.float32, torch.device("cpu"))
        expected = _core_update(target, patch, weight, strength)
        assert expected.abs().max() > 0
        probe = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(3))
        dense, separate = runtime_update(model, adapters[module_path], module_path, weight, probe, strength)
        torch.testing.assert_close(dense, expected, rtol=1e-4, atol=2e-5, msg=lambda m: f"{module_path}: {m}")
        torch.testing.assert_close(separate, probe @ expected.T, rtol=1e-3, atol=1e-3,
                                   msg=lambda m: f"{module_path}: {m}")


def test_lokr_and_dora_on_the_quantized_model_through_the_node_path(pack, models_dir, scratch_models):
    """FluxQApplyLoRA's loader on the Q8_0 GGUF model (DoRA reads the dequantized weight) against core's
    merge on the gguf package's dequantization of the same tensor, at every strength."""
    import comfy.lora
    import gguf
    from comfyui_flux_qlora.nodes.comfy_glue import load_lora_entry
    from safetensors.torch import save_file

    model = tiny_gguf_model(models_dir, "Q8_0")
    g = torch.Generator().manual_seed(9)
    lokr, dora = "lora_unet_double_blocks_0_txt_attn_proj", "lora_unet_double_blocks_0_img_attn_proj"
    lora_sd = {f"{lokr}.lokr_w1": torch.randn(8, 8, generator=g), f"{lokr}.lokr_w2_a": 0.05 * torch.randn(384, 4, generator=g),
               f"{lokr}.lokr_w2_b": 0.05 * torch.randn(4, 384, generator=g), f"{lokr}.alpha": torch.tensor(2.0),
               f"{dora}.lora_down.weight": 0.02 * torch.randn(4, 3072, generator=g),
               f"{dora}.lora_up.weight": torch.randn(3072, 4, generator=g),
               f"{dora}.dora_scale": 1 + 0.3 * torch.randn(1, 3072, generator=g)}
    save_file(lora_sd, str(scratch_models / "loras" / "lycoris-q8.safetensors"))

    reader = gguf.GGUFReader(str(tiny_gguf_path(models_dir, "Q8_0")))
    tensors = {t.name: t for t in reader.tensors}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    probe = torch.randn(2, 3072, generator=g)
    for strength in (1.0, 0.5, -0.7):
        entry, _, report = load_lora_entry(model, "lycoris-q8.safetensors", strength)
        assert "2 modules matched, 0 keys unmatched" in report
        for target, patch in comfy.lora.load_lora(lora_sd, key_map, log_missing=False).items():
            module_path = target[len("diffusion_model."):-len(".weight")]
            t = tensors[module_path + ".weight"]
            weight = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32")).reshape(3072, 3072)
            expected = _core_update(target, patch, weight, strength)
            _, separate = runtime_update(model, entry.adapters[module_path], module_path, weight, probe, strength)
            torch.testing.assert_close(separate, probe @ expected.T, rtol=1e-3, atol=1e-3,
                                       msg=lambda m: f"{module_path} at {strength}: {m}")
