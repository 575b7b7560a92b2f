"""LoRA files written by diffusers/PEFT themselves, applied by the pack exactly as diffusers applies them.

A PEFT adapter on a FluxTransformer2DModel shaped like the tiny FLUX is saved with
`FluxPipeline.save_lora_weights` (the LoraConfig goes into the safetensors header, no `.alpha`
tensors). Ground truth is PEFT's own per-module update (`get_delta_weight`, what `fuse_lora` adds).
The pack's update on the BFL model is mapped back to diffusers names with diffusers' own
single-file converter, then compared module by module. The diffusers model is built on the meta
device and left uninitialised: only the LoRA layers are read.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open

from fluxq_testing import tiny_gguf_model

HIDDEN = 3072
# Every linear layer of a diffusers FLUX.1 transformer with one double and one single block
# (fixed names: ComfyUI's flux_to_diffusers also lists aliases that diffusers' FLUX lacks).
DOUBLE = ("norm1.linear", "norm1_context.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
          "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
          "ff_context.net.0.proj", "ff_context.net.2")
SINGLE = ("norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
TOP = ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
       "time_text_embed.timestep_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
       "time_text_embed.guidance_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
       "time_text_embed.text_embedder.linear_2", "norm_out.linear", "proj_out")
# the usual target set (attention, MLP, modulation of every block) and all linear layers
USUAL = [f"transformer_blocks.0.{m}" for m in DOUBLE] + [f"single_transformer_blocks.0.{m}" for m in SINGLE]
ALL_LINEAR = USUAL + list(TOP)


@pytest.fixture(scope="module")
def model(pack, models_dir):
    return tiny_gguf_model(models_dir, "F16")


def diffusers_transformer():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=HIDDEN // 128,
            joint_attention_dim=768, pooled_projection_dim=768, guidance_embeds=True,
        )
    return transformer.to_empty(device="cpu")


def write_peft_lora(path, targets, **config):
    """A LoRA as diffusers' training scripts save it: PEFT adapter, LoraConfig in the header."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    transformer = diffusers_transformer()
    transformer.add_adapter(LoraConfig(target_modules=targets, init_lora_weights=False, **config))
    FluxPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return {name: transformer.get_submodule(name).get_delta_weight("default") for name in targets}


def pack_updates_in_diffusers_names(model, lora_name, strength=1.0):
    """The pack's runtime update of every BFL layer, through diffusers' own BFL -> diffusers converter."""
    from comfyui_flux_qlora.nodes.comfy_glue import load_lora_entry
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    entry, _, report = load_lora_entry(model, lora_name, strength)
    diffusion_model = model.model.diffusion_model
    # ComfyUI 0.33 names the q/k norm parameters `.weight`; BFL files (and the converter) say `.scale`
    checkpoint = {re.sub(r"(query|key)_norm\.weight$", r"\1_norm.scale", k): torch.zeros(()).expand(v.shape)
                  for k, v in diffusion_model.state_dict().items()}
    for path, adapters in entry.adapters.items():
        weight = diffusion_model.get_submodule(path).weight
        delta = torch.zeros(weight.shape)
        for adapter in adapters:
            rows = delta if adapter.out_slice is None else delta.narrow(0, *adapter.out_slice)
            rows += strength * adapter.dense_delta(rows)
        checkpoint[f"{path}.weight"] = delta
    return convert_flux_transformer_checkpoint_to_diffusers(checkpoint), report


def test_peft_lora_on_every_linear_with_alpha_in_the_header_matches_diffusers(model, scratch_models):
    path = scratch_models / "loras" / "peft-all-linear.safetensors"
    # alpha 8 over rank 4 (scale 2), one module family at rank 2 and one at alpha 3: diffusers' own rules
    expected = write_peft_lora(path, ALL_LINEAR, r=4, lora_alpha=8, rank_pattern={"attn.to_k": 2},
                               alpha_pattern={"proj_out": 3})
    with safe_open(str(path), framework="pt") as f:
        assert not any(k.endswith(".alpha") for k in f.keys())
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 8

    strength = -0.7
    ours, report = pack_updates_in_diffusers_names(model, path.name, strength)
    assert "0 keys unmatched" in report and "lora_adapter_metadata" in report
    # the usual target set (q/k/v and proj_mlp as row slices of the fused layers) and every other
    # linear, norm_out.linear's [scale; shift] rows included
    for name, delta in expected.items():
        assert delta.abs().max() > 0
        torch.testing.assert_close(ours[f"{name}.weight"], strength * delta, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    untouched = [k for k in ours if k.endswith(".weight") and k[: -len(".weight")] not in expected]
    assert untouched and all(not ours[k].any() for k in untouched)


def test_kohya_lora_with_alpha_tensors_matches_diffusers(model, scratch_models):
    """alpha != rank in `.alpha` tensors: diffusers' kohya converter folds it into the weights."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    diffusion_model = model.model.diffusion_model
    sd = {}
    for path in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1",
                 "single_blocks.0.modulation.lin"):
        layer = diffusion_model.get_submodule(path)
        name = "lora_unet_" + path.replace(".", "_")
        sd |= {f"{name}.lora_down.weight": torch.randn(4, layer.in_features, generator=g) / 50,
               f"{name}.lora_up.weight": torch.randn(layer.out_features, 4, generator=g),
               f"{name}.alpha": torch.tensor(6.0)}
    path = scratch_models / "loras" / "kohya-alpha.safetensors"
    save_file(sd, str(path))

    transformer = diffusers_transformer()
    transformer.load_lora_adapter(FluxPipeline.lora_state_dict(str(path)), prefix="transformer", adapter_name="k")
    adapted = [n for n, m in transformer.named_modules() if "k" in getattr(m, "lora_A", {})]
    assert len(adapted) == 9  # qkv and linear1 split into q/k/v (+ proj_mlp)
    ours, report = pack_updates_in_diffusers_names(model, path.name)
    assert "scale alpha/rank from the file's .alpha tensors" in report
    for name in adapted:
        torch.testing.assert_close(ours[f"{name}.weight"], transformer.get_submodule(name).get_delta_weight("k"),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
