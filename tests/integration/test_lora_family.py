"""LoRA files of the FLUX family as trainers write them, applied on the quantized tiny models, per
layer against oracles. FLUX.2 ([dev], [klein], klein's LoKr) against two:

- core ComfyUI: `comfy.lora.load_lora` with core's own key map reads the file as it is (no help
  from the pack), `calculate_weight` merges it onto the gguf package's dequantization of the layer;
- diffusers: `Flux2LoraLoaderMixin.lora_state_dict` (its own FLUX.2 conversions) loaded by PEFT into
  a tiny `Flux2Transformer2DModel` holding the same tensors (diffusers' own single-file converter
  maps them), each module's `get_delta_weight` (what `fuse_lora` adds).

Each format is checked against every oracle that reads it; together they cover every linear layer.
The pack's update is taken both ways: `dense_delta` (what a fold adds) and the quantized layer's
forward with the LoRA active (the separate path), which must equal the dequantized weight plus the
oracle's update. ComfyUI 0.3.75 cannot build a 128-wide FLUX.2 (its detection fixes 48 heads).
Kontext's hosted-trainer PEFT files and Chroma's ai-toolkit files against core.
"""

import pytest
import torch
from safetensors.torch import save_file

from fluxq_testing import comfyui_is_0_33, dequantized_state_dict, runtime_update

RANK = 4
STRENGTH = 0.8


@pytest.fixture(scope="module")
def flux2(request, models_dir):
    """(member id, the pack's quantized model, the dequantized float tensors)."""
    if not comfyui_is_0_33():
        pytest.skip("ComfyUI 0.3.75 cannot build the 128-wide tiny FLUX.2 (its detection fixes 48 heads); "
                    "the refusal is tested in test_flux_family_server.py")
    request.getfixturevalue("pack")  # imported only where it runs
    from comfyui_flux_qlora.nodes.comfy_glue import load_flux_gguf

    path = models_dir / "diffusion_models" / f"fluxq-tiny-{request.param}-Q8_0.gguf"
    return request.param, load_flux_gguf(str(path)), dequantized_state_dict(path)


def linear_paths(model):
    return [name for name, module in model.model.diffusion_model.named_modules() if hasattr(module, "in_features")]


def random_factors(model, seed):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in linear_paths(model):
        layer = model.model.diffusion_model.get_submodule(path)
        factors[path] = (torch.randn(RANK, layer.in_features, generator=g) / layer.in_features ** 0.5,
                         0.3 * torch.randn(layer.out_features, RANK, generator=g))
    return factors


def bfl_file(factors, prefix):
    """ai-toolkit (`diffusion_model.`) or hosted-trainer PEFT (`base_model.model.`) names, no alpha."""
    return {f"{prefix}{path}.lora_{side}.weight": t
            for path, (down, up) in factors.items() for side, t in (("A", down), ("B", up))}


def kohya_file(factors, alpha):
    """musubi-tuner / kohya: `lora_unet_` + BFL names with underscores, `.alpha` tensors."""
    sd = {}
    for path, (down, up) in factors.items():
        name = "lora_unet_" + path.replace(".", "_")
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    return sd


def diffusers_transformer(member_id, tensors):
    """A tiny Flux2Transformer2DModel holding the tiny GGUF's dequantized tensors (diffusers' converter)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        transformer = Flux2Transformer2DModel(
            num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=1,
            joint_attention_dim=768, guidance_embeds=member_id == "flux2-dev")
    transformer = transformer.to_empty(device="cpu")
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(tensors))
    missing, unexpected = transformer.load_state_dict(converted, strict=False)
    assert not unexpected and all(".norm" in k for k in missing), (missing, unexpected)  # RMSNorm scales: float files
    return transformer


def diffusers_updates(member_id, tensors, lora_path):
    """diffusers' reading of the file: {diffusers module: PEFT's delta weight}."""
    from diffusers import Flux2Pipeline

    transformer = diffusers_transformer(member_id, tensors)
    state_dict, metadata = Flux2Pipeline.lora_state_dict(str(lora_path), return_lora_metadata=True)
    transformer.load_lora_adapter(state_dict, prefix="transformer", adapter_name="x", metadata=metadata)
    return {name: module.get_delta_weight("x") for name, module in transformer.named_modules()
            if "x" in getattr(module, "lora_A", {})}


def core_updates(model, tensors, lora_sd):
    """Core's reading of the file as it is: {BFL module: merged weight - weight} on the float tensors."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    by_key = {}
    for target, patch in comfy.lora.load_lora(lora_sd, key_map, log_missing=False).items():
        key, offset, function = (target, None, None) if isinstance(target, str) else (*target, None)[:3]
        by_key.setdefault(key, []).append((STRENGTH, patch, 1.0, offset, function))
    updates = {}
    for key, patches in by_key.items():
        module_path = key[len("diffusion_model."):-len(".weight")]
        weight = tensors[f"{module_path}.weight"]
        updates[module_path] = comfy.lora.calculate_weight(patches, weight.clone(), key) - weight
    return updates


class ZeroWeights:
    """Each layer's weight as zeros, made when asked: a LoRA's or LoKr's update does not depend on
    the weight (core merges onto it, the pack never reads it), and the 3072-wide models' float
    copies would cost GBs."""

    def __init__(self, model):
        self.diffusion_model = model.model.diffusion_model

    def __getitem__(self, key):
        layer = self.diffusion_model.get_submodule(key[: -len(".weight")])
        return torch.zeros(layer.out_features, layer.in_features)


def pack_updates(model, tensors, lora_name):
    """The pack's update of each BFL layer it adapts, as folded (dense) and as the quantized layer
    runs it (separate path on a probe); with the loader's report."""
    from comfyui_flux_qlora.nodes.comfy_glue import load_lora_entry

    entry, _, report = load_lora_entry(model, lora_name, STRENGTH)
    g = torch.Generator().manual_seed(3)
    updates = {}
    for path, adapters in entry.adapters.items():
        weight = tensors[f"{path}.weight"]
        probe = torch.randn(2, weight.shape[1], generator=g)
        dense, separate = runtime_update(model, adapters, path, weight, probe, STRENGTH)
        updates[path] = (dense, probe, separate)
    return updates, report


def in_diffusers_names(updates):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    converted = convert_flux2_transformer_checkpoint_to_diffusers(
        {f"{path}.weight": dense for path, (dense, _, _) in updates.items()})
    return {name[: -len(".weight")]: delta for name, delta in converted.items()}


def check(ours, expected, name):
    assert expected.abs().max() > 0, name
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


FORMATS = {
    # name -> (file from the factors, the file core's key map reads: the same, or its ai-toolkit twin)
    "ai-toolkit": (lambda f: bfl_file(f, "diffusion_model."), None),
    "peft-bfl": (lambda f: bfl_file(f, "base_model.model."), lambda f: bfl_file(f, "diffusion_model.")),
    "kohya": (lambda f: kohya_file(f, alpha=RANK / 2), None),
}
# What diffusers' kohya FLUX.2 converter leaves out (it warns "Unsupported keys").
KOHYA_NOT_IN_DIFFUSERS = {"double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                          "single_stream_modulation.linear", "norm_out.linear"}


# klein in every format; [dev] (its guidance_in besides) in the one both oracles read whole
@pytest.mark.parametrize(("flux2", "fmt"), [("flux2-klein-4b", f) for f in FORMATS] + [("flux2-dev", "ai-toolkit")],
                         indirect=["flux2"])
def test_bfl_named_formats_equal_core_and_diffusers(flux2, scratch_models, fmt):
    member_id, model, tensors = flux2
    writer, core_twin = FORMATS[fmt]
    factors = random_factors(model, seed=len(fmt))
    lora_sd = writer(factors)
    lora_path = scratch_models / "loras" / f"flux2-{member_id}-{fmt}.safetensors"
    save_file(lora_sd, str(lora_path))

    ours, report = pack_updates(model, tensors, lora_path.name)
    assert f"{len(linear_paths(model))} modules matched, 0 keys unmatched" in report, report
    for path, (dense, probe, separate) in ours.items():  # the quantized layer runs what a fold adds
        torch.testing.assert_close(separate, probe @ dense.T, rtol=1e-3, atol=1e-4, msg=lambda m: f"{path}: {m}")

    expected = core_updates(model, tensors, (core_twin or writer)(factors))
    assert set(expected) == set(ours)
    for path, delta in expected.items():
        check(ours[path][0], delta, path)
    # diffusers 0.42's ai-toolkit converter maps final_layer.adaLN_modulation.1 to norm_out.linear
    # without the [shift; scale] -> [scale; shift] row swap its weight converter makes, so that
    # layer's update lands on other rows there: compared with core only (above).
    diffusers = diffusers_updates(member_id, tensors, lora_path)
    ours_diffusers = in_diffusers_names(ours)
    assert set(ours_diffusers) - set(diffusers) == (KOHYA_NOT_IN_DIFFUSERS if fmt == "kohya" else set())
    for name, delta in diffusers.items():
        if name != "norm_out.linear":
            check(ours_diffusers[name], STRENGTH * delta, name)


@pytest.mark.parametrize("flux2", ["flux2-klein-4b", "flux2-dev"], indirect=True)
def test_diffusers_saved_lora_on_every_linear_equals_peft(flux2, scratch_models):
    """SimpleTuner / diffusers training scripts: PEFT on the diffusers model, `Flux2Pipeline.save_lora_weights`
    (LoraConfig in the header, q/k/v apart, the global modulation and time/guidance embedders by their
    diffusers names, which core's key map lacks)."""
    from diffusers import Flux2Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    member_id, model, tensors = flux2
    transformer = diffusers_transformer(member_id, tensors)
    targets = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    torch.manual_seed(1)
    transformer.add_adapter(LoraConfig(target_modules=targets, r=RANK, lora_alpha=8, rank_pattern={"to_k": 2},
                                       init_lora_weights=False))
    lora_path = scratch_models / "loras" / f"flux2-{member_id}-diffusers.safetensors"
    Flux2Pipeline.save_lora_weights(
        str(lora_path.parent), weight_name=lora_path.name,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    expected = {name: transformer.get_submodule(name).get_delta_weight("default") for name in targets}

    ours, report = pack_updates(model, tensors, lora_path.name)
    assert f"{len(linear_paths(model))} modules matched, 0 keys unmatched" in report, report
    ours_diffusers = in_diffusers_names(ours)
    assert set(ours_diffusers) == set(expected)
    for name, delta in expected.items():
        check(ours_diffusers[name], STRENGTH * delta, name)


def lokr_file(model, seed):
    """LoKr as ai-toolkit writes it for klein (`diffusion_model.` + BFL names; w1 whole, w2 whole or
    factorised with an alpha), the image q/k/v as SimpleTuner's LyCORIS names them (diffusers
    modules with underscores: row slices of the fused qkv)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return scale * torch.randn(*shape, generator=g)

    sd = {}
    for i, path in enumerate(p for p in linear_paths(model) if p != "double_blocks.0.img_attn.qkv"):
        layer = model.model.diffusion_model.get_submodule(path)
        name, (out2, in2) = f"diffusion_model.{path}", (layer.out_features // 4, layer.in_features // 4)
        sd[f"{name}.lokr_w1"] = rnd(4, 4, scale=1.0)
        if i % 2:
            sd |= {f"{name}.lokr_w2_a": rnd(out2, 2), f"{name}.lokr_w2_b": rnd(2, in2),
                   f"{name}.alpha": torch.tensor(3.0)}
        else:
            sd[f"{name}.lokr_w2"] = rnd(out2, in2)
    for part in ("to_q", "to_k", "to_v"):
        sd |= {f"lycoris_transformer_blocks_0_attn_{part}.lokr_w1": rnd(4, 4, scale=1.0),
               f"lycoris_transformer_blocks_0_attn_{part}.lokr_w2": rnd(32, 32)}
    return sd


@pytest.mark.parametrize("flux2", ["flux2-klein-4b"], indirect=True)
def test_lokr_on_klein_equals_core(flux2, scratch_models):
    member_id, model, tensors = flux2
    lora_sd = lokr_file(model, seed=11)
    lora_path = scratch_models / "loras" / f"lokr-{member_id}.safetensors"
    save_file(lora_sd, str(lora_path))

    ours, report = pack_updates(model, tensors, lora_path.name)
    assert f"{len(linear_paths(model))} modules matched, 0 keys unmatched" in report, report
    assert "LoKr with unfactorised matrices" in report and "scale alpha/rank" in report
    expected = core_updates(model, tensors, lora_sd)
    assert set(expected) == set(ours)
    for path, delta in expected.items():
        dense, probe, separate = ours[path]
        check(dense, delta, path)
        torch.testing.assert_close(separate, probe @ delta.T, rtol=1e-3, atol=1e-4, msg=lambda m: f"{path}: {m}")


# --- FLUX.1 Kontext and Chroma -------------------------------------------------------------------


def test_kontext_peft_file_on_every_linear_equals_core(pack, models_dir, scratch_models):
    """fal's Kontext trainer: PEFT with BFL names under `base_model.model.` (core reads none of them)
    on every linear layer (modulation, vector_in, guidance_in, the final layer's [shift; scale] rows);
    core reads the file's ai-toolkit twin. Kontext [dev] is FLUX.1 [dev]'s architecture: the 128-wide
    tiny Fill (FLUX.1 [dev] with a wider img_in) stands in for it at a fraction of the 3072-wide
    tiny dev's cost, so like it this needs ComfyUI 0.33."""
    from comfyui_flux_qlora.nodes.comfy_glue import load_flux_gguf

    if not comfyui_is_0_33():
        pytest.skip("ComfyUI 0.3.75 cannot build the 128-wide tiny FLUX.1 (its detection fixes 24 heads)")
    model = load_flux_gguf(str(models_dir / "diffusion_models" / "fluxq-tiny-flux1-fill-dev-Q8_0.gguf"))
    factors = random_factors(model, seed=5)
    assert {"double_blocks.0.img_mod.lin", "vector_in.in_layer", "guidance_in.out_layer",
            "final_layer.adaLN_modulation.1"} <= set(factors)
    save_file(bfl_file(factors, "base_model.model."), str(scratch_models / "loras" / "kontext-peft.safetensors"))
    weights = ZeroWeights(model)
    ours, report = pack_updates(model, weights, "kontext-peft.safetensors")
    assert f"{len(factors)} modules matched, 0 keys unmatched" in report, report
    expected = core_updates(model, weights, bfl_file(factors, "diffusion_model."))
    assert set(expected) == set(ours) == set(factors)
    for path, delta in expected.items():
        dense, probe, separate = ours[path]
        check(dense, delta, path)
        torch.testing.assert_close(separate, probe @ delta.T, rtol=1e-3, atol=1e-4, msg=lambda m: f"{path}: {m}")


def test_chroma_ai_toolkit_file_equals_core(pack, models_dir, scratch_models):
    """ai-toolkit's Chroma LoRAs: `diffusion_model.` + BFL names on the blocks (Chroma's have no
    modulation layers) and its approximator (distilled_guidance_layer); core reads the same file.
    The tiny Chroma is 3072 wide (its approximator's size is fixed): a few of the smaller layers."""
    from comfyui_flux_qlora.nodes.comfy_glue import load_flux_gguf

    model = load_flux_gguf(str(models_dir / "diffusion_models" / "fluxq-tiny-chroma-Q8_0.gguf"))
    paths = ("double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.proj", "distilled_guidance_layer.in_proj",
             "distilled_guidance_layer.out_proj")
    factors = {path: f for path, f in random_factors(model, seed=6).items() if path in paths}
    lora_sd = bfl_file(factors, "diffusion_model.")
    save_file(lora_sd, str(scratch_models / "loras" / "chroma-ai-toolkit.safetensors"))
    weights = ZeroWeights(model)
    ours, report = pack_updates(model, weights, "chroma-ai-toolkit.safetensors")
    assert "(bfl): 4 modules matched, 0 keys unmatched" in report, report
    expected = core_updates(model, weights, lora_sd)
    assert set(expected) == set(ours) == set(paths)
    for path, delta in expected.items():
        dense, probe, separate = ours[path]
        check(dense, delta, path)
        torch.testing.assert_close(separate, probe @ delta.T, rtol=1e-3, atol=1e-3, msg=lambda m: f"{path}: {m}")
