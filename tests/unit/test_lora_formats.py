import pickle

import pytest
import torch
from safetensors.torch import save_file

from lora_ops.lora_formats import (
    LoraFormatError,
    describe_format,
    detect_format,
    kohya_name,
    module_path_from_kohya_name,
    normalize_flux_lora,
    read_lora_file,
    validate_lora_tensors,
)


def _sd(*keys: str) -> dict[str, torch.Tensor]:
    return {k: torch.ones(2, 2) for k in keys}


KOHYA = _sd(
    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
    "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
    "lora_unet_double_blocks_0_img_attn_qkv.alpha",
    "lora_unet_single_blocks_0_linear1.lora_down.weight",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",  # kohya FLUX may train CLIP-L too
)
DIFFUSERS = _sd(
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
    "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
    "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
)
XLABS = _sd(
    "double_blocks.0.processor.qkv_lora1.down.weight",
    "double_blocks.0.processor.qkv_lora1.up.weight",
    "double_blocks.0.processor.proj_lora1.down.weight",
    "double_blocks.0.processor.proj_lora1.up.weight",
    "double_blocks.0.processor.qkv_lora2.down.weight",
    "double_blocks.0.processor.proj_lora2.up.weight",
    "single_blocks.1.processor.qkv_lora.down.weight",
    "single_blocks.1.processor.proj_lora.up.weight",
)
BFL = _sd(
    "double_blocks.0.img_attn.qkv.lora_A.weight",
    "double_blocks.0.img_attn.qkv.lora_B.weight",
    "single_blocks.0.linear2.lora_A.weight",
    "final_layer.linear.lora_A.weight",
)
LYCORIS = _sd(
    "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1",
    "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_a",
    "lycoris_single_transformer_blocks_0_attn_to_q.hada_w1_a",
)
SDXL = _sd(
    "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
    "lora_unet_input_blocks_4_1_proj_in.alpha",
    "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
)
SD15 = _sd(
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
)


@pytest.mark.parametrize(
    "sd, expected",
    [
        (KOHYA, "kohya"),
        (DIFFUSERS, "diffusers"),
        (XLABS, "xlabs"),
        (BFL, "bfl"),
        (LYCORIS, "lycoris"),
        (SDXL, "sdxl"),
        (SD15, "sd15"),
        (_sd("transformer.single_transformer_blocks.0.attn.to_q.lora.down.weight"), "diffusers"),
        (_sd("base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"), "diffusers"),
        (_sd("lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"), "diffusers"),
        (_sd("diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"), "bfl"),
        (_sd("model.layers.0.q_proj.weight"), "unknown"),
        ({}, "unknown"),
    ],
)
def test_detect_format(sd, expected):
    assert detect_format(sd.keys()) == expected


def test_formats_core_maps_pass_through_unchanged():
    for sd in (KOHYA, DIFFUSERS, LYCORIS):
        out = normalize_flux_lora(sd)
        assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)


def test_xlabs_maps_onto_bfl_modules_without_alpha():
    out = normalize_flux_lora(XLABS)
    assert set(out) == {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight",
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight",
        "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight",
        "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight",
        "diffusion_model.double_blocks.0.txt_attn.qkv.lora_down.weight",
        "diffusion_model.double_blocks.0.txt_attn.proj.lora_up.weight",
        "diffusion_model.single_blocks.1.linear1_qkv.lora_down.weight",
        "diffusion_model.single_blocks.1.linear2.lora_up.weight",
    }
    assert out["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"] is XLABS[
        "double_blocks.0.processor.qkv_lora1.up.weight"
    ]


def test_bare_and_peft_names_get_the_prefix_core_expects():
    out = normalize_flux_lora(
        {**BFL, **_sd("base_model.model.transformer_blocks.0.attn.to_k.lora_A.weight", "x_embedder.lora_B.weight")}
    )
    assert set(out) == {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight",
        "diffusion_model.single_blocks.0.linear2.lora_A.weight",
        "diffusion_model.final_layer.linear.lora_A.weight",
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight",
        "transformer.x_embedder.lora_B.weight",
    }


def test_flux2_global_layers_get_their_bfl_names_in_every_spelling():
    """PEFT (hosted trainers) names FLUX.2's global modulation by its BFL name; diffusers by its own
    names, which core's key map (written for FLUX.1) lacks: both reach the BFL module."""
    out = normalize_flux_lora(_sd(
        "base_model.model.double_stream_modulation_img.lin.lora_A.weight",
        "base_model.model.distilled_guidance_layer.layers.0.in_layer.lora_A.weight",
        "transformer.double_stream_modulation_txt.linear.lora_B.weight",
        "single_stream_modulation.linear.lora_A.weight",
        "base_model.model.time_guidance_embed.timestep_embedder.linear_2.lora_A.weight",
        "transformer.time_guidance_embed.guidance_embedder.linear_1.alpha",
        # the unsplit block layers (ComfyUI 0.3.75's key map lacks them), LoKr and DoRA keys alike
        "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight",
        "single_transformer_blocks.3.attn.to_out.lokr_w1",
        "base_model.model.transformer_blocks.1.ff_context.linear_out.dora_scale",
        "transformer.transformer_blocks.2.ff.linear_in.lora_B.weight",
        # FLUX.1's names, which every core maps, stay as they are
        "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight",
        "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight",
    ))
    assert set(out) == {
        "diffusion_model.double_stream_modulation_img.lin.lora_A.weight",
        "diffusion_model.distilled_guidance_layer.layers.0.in_layer.lora_A.weight",
        "diffusion_model.double_stream_modulation_txt.lin.lora_B.weight",
        "diffusion_model.single_stream_modulation.lin.lora_A.weight",
        "diffusion_model.time_in.out_layer.lora_A.weight",
        "diffusion_model.guidance_in.in_layer.alpha",
        "diffusion_model.single_blocks.0.linear1.lora_A.weight",
        "diffusion_model.single_blocks.3.linear2.lokr_w1",
        "diffusion_model.double_blocks.1.txt_mlp.2.dora_scale",
        "diffusion_model.double_blocks.2.img_mlp.0.lora_B.weight",
        "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight",
        "transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight",
    }


def test_bfl_control_lora_is_left_to_core():
    sd = _sd("img_in.lora_A.weight", "img_in.lora_B.weight", "single_blocks.0.norm.key_norm.scale")
    assert set(normalize_flux_lora(sd)) == set(sd)


def test_colliding_keys_are_refused():
    with pytest.raises(LoraFormatError, match="diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"):
        normalize_flux_lora(
            _sd("double_blocks.0.img_attn.qkv.lora_A.weight", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight")
        )


def test_descriptions_name_the_family_and_an_example_key():
    text = describe_format(SDXL.keys())
    assert text.startswith("looks like an SDXL LoRA") and "lora_unet_input_blocks_4_1_proj_in" in text
    assert "kohya" in describe_format(KOHYA.keys())
    assert "not a LoRA layout" in describe_format(["model.layers.0.q_proj.weight"])
    assert describe_format([]) == "holds no tensors"


def test_kohya_names_round_trip():
    paths = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.10.linear1"]
    for path in paths:
        assert module_path_from_kohya_name(kohya_name(path), paths) == path
    assert kohya_name("double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"
    with pytest.raises(KeyError, match="no module"):
        module_path_from_kohya_name("lora_unet_nothing", paths)


def test_validation_names_file_and_key():
    validate_lora_tensors({"a.alpha": torch.tensor(16), "a.lora_up.weight": torch.ones(2, 2)}, "ok.safetensors")
    with pytest.raises(LoraFormatError, match="holds no tensors"):
        validate_lora_tensors({}, "empty.safetensors")
    with pytest.raises(LoraFormatError, match=r"bad\.safetensors.*'a\.lora_up\.weight'.*NaN"):
        validate_lora_tensors({"a.lora_up.weight": torch.tensor([1.0, float("nan")])}, "bad.safetensors")
    with pytest.raises(LoraFormatError, match="NaN or Inf"):
        validate_lora_tensors({"a.lora_up.weight": torch.tensor([float("inf")]).to(torch.float8_e5m2)}, "f8")
    with pytest.raises(LoraFormatError, match=r"'a\.lora_up\.weight'.*int8"):
        validate_lora_tensors({"a.lora_up.weight": torch.ones(2, dtype=torch.int8)}, "int.safetensors")


def test_read_lora_file_round_trip(tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(KOHYA, path)
    loaded = read_lora_file(path)
    assert set(loaded) == set(KOHYA)


def test_read_lora_file_refuses_pickles(tmp_path):
    zipped, legacy = tmp_path / "lora.pt", tmp_path / "lora.ckpt"
    torch.save(KOHYA, zipped)
    legacy.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(LoraFormatError, match="pickle.*not a safetensors file.*arbitrary code"):
            read_lora_file(path)


def test_read_lora_file_refuses_garbage_and_empty(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoraFormatError, match="not valid JSON"):
        read_lora_file(garbage)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(LoraFormatError, match="not a safetensors file"):
        read_lora_file(short)
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(LoraFormatError, match="does not start with a safetensors header"):
        read_lora_file(huge_header)
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    with pytest.raises(LoraFormatError, match="holds no tensors"):
        read_lora_file(empty)


# --- scale recorded in the header ---------------------------------------------------------------


def _header(**config) -> dict[str, str]:
    import json

    return {"format": "pt", "lora_adapter_metadata": json.dumps(config)}


def test_header_scale_follows_peft_rule():
    from lora_ops.lora_formats import header_scale

    assert header_scale(None, "f") is None and header_scale({"format": "pt"}, "f") is None
    rule = header_scale(_header(r=4, lora_alpha=8, rank_pattern={"attn.to_k": 2}, alpha_pattern={"proj_out": 3}), "f")
    assert rule.scale("transformer_blocks.0.attn.to_q", 4, "f") == 2.0
    assert rule.scale("transformer_blocks.0.attn.to_k", 2, "f") == 4.0  # rank_pattern: 8 / 2
    assert rule.scale("single_transformer_blocks.0.proj_out", 4, "f") == 0.75  # alpha_pattern: 3 / 4
    assert rule.scale("proj_out", 4, "f") == 0.75  # the pattern matches the whole name too
    assert rule.scale("single_transformer_blocks.0.xproj_out", 4, "f") == 2.0  # but only at a name boundary
    rs = header_scale(_header(r=16, lora_alpha=8, use_rslora=True), "f")
    assert rs.scale("x_embedder", 16, "f") == 2.0  # alpha / sqrt(r)
    # a pipeline's save_lora_weights prefixes each component's config keys
    piped = header_scale(_header(**{"transformer.r": 4, "transformer.lora_alpha": 2}), "f")
    assert piped.scale("proj_out", 4, "f") == 0.5


def test_header_scale_errors_name_file_and_value():
    from lora_ops.lora_formats import header_scale

    with pytest.raises(LoraFormatError, match=r"my\.safetensors.*to_k rank 4.*rank 8"):
        header_scale(_header(r=4, lora_alpha=4), "my.safetensors").scale("attn.to_k", 8, "my.safetensors")
    with pytest.raises(LoraFormatError, match="lora_adapter_metadata is not valid JSON"):
        header_scale({"lora_adapter_metadata": "{oops"}, "my.safetensors")
    with pytest.raises(LoraFormatError, match="r=0"):
        header_scale(_header(r=0, lora_alpha=4), "my.safetensors")


def test_read_lora_file_with_metadata(tmp_path):
    from lora_ops.lora_formats import read_lora_file_with_metadata

    path = tmp_path / "peft.safetensors"
    save_file(DIFFUSERS, path, metadata=_header(r=2, lora_alpha=4))
    sd, metadata = read_lora_file_with_metadata(path)
    assert set(sd) == set(DIFFUSERS) and "lora_adapter_metadata" in metadata


def test_kohya_names_made_from_diffusers_modules_are_described_as_such():
    # what diffusers' SD-era convert_state_dict_to_kohya writes for a FLUX PEFT LoRA
    keys = ["transformer_single_transformer_blocks_0_attn_to_k.lora_down.weight",
            "transformer_single_transformer_blocks_0_attn_to_k.alpha",
            "transformer_transformer_blocks_0_attn_to_q.lora_up.weight"]
    assert detect_format(keys) == "kohya_diffusers_names"
    text = describe_format(keys)
    assert "SD-style kohya names built from diffusers module names" in text
    assert "not a FLUX layout any loader reads" in text and "diffusers/PEFT" not in text
    assert "transformer_single_transformer_blocks_0_attn_to_k.alpha" in text  # two example keys
    # the names core does map are unaffected
    assert detect_format(["lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"]) == "diffusers"
    assert detect_format(["lycoris_transformer_blocks_0_attn_to_q.lokr_w1"]) == "lycoris"
