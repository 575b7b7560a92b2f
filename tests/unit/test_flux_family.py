"""The FLUX family registry: detection by ComfyUI class + config, version refusals, LoRA families."""

import pytest

from lora_ops import flux_family as ff


def config(hidden, depth, single, **extra):
    return {"hidden_size": hidden, "depth": depth, "depth_single_blocks": single, **extra}


FULL = {
    # (ComfyUI class, detected config) of each released checkpoint -> (member id, label)
    "dev": ("Flux", config(3072, 19, 38, guidance_embed=True, in_channels=16), "flux1-dev", "FLUX.1 [dev]"),
    "schnell": ("FluxSchnell", config(3072, 19, 38, guidance_embed=False, in_channels=16), "flux1-schnell",
                "FLUX.1 [schnell]"),
    "fill": ("FluxInpaint", config(3072, 19, 38, guidance_embed=True, in_channels=96), "flux1-fill-dev",
             "FLUX.1 Fill [dev]"),
    "flux2": ("Flux2", config(6144, 8, 48, guidance_embed=True, in_channels=128), "flux2-dev", "FLUX.2 [dev]"),
    "klein4": ("Flux2", config(3072, 5, 20, guidance_embed=False, in_channels=128), "flux2-klein-4b",
               "FLUX.2 [klein] 4B"),
    "klein9": ("Flux2", config(4096, 8, 24, guidance_embed=False, in_channels=128), "flux2-klein-9b",
               "FLUX.2 [klein] 9B"),
    "chroma": ("Chroma", config(3072, 19, 38, in_channels=64), "chroma", "Chroma"),
}


@pytest.mark.parametrize("name", FULL)
def test_released_checkpoints_are_identified_by_class_and_size(name):
    comfy_class, cfg, member_id, label = FULL[name]
    detection = ff.identify(comfy_class, cfg)
    assert detection.member.id == member_id
    assert detection.released_size
    assert detection.label == label
    assert detection.member.base_model == member_id
    assert comfy_class in ff.ALLOWED_COMFY_CLASSES


def test_identical_tensors_are_named_so_the_user_picks():
    dev = ff.identify(*FULL["dev"][:2])
    assert [m.id for m in dev.candidates] == ["flux1-dev", "flux1-kontext-dev", "flux1-krea-dev"]
    text = dev.describe()
    assert "FLUX.1 Kontext [dev]" in text and "FLUX.1 Krea [dev]" in text and "cannot be told apart" in text
    klein = ff.identify(*FULL["klein9"][:2])
    assert klein.candidates == (ff.BY_ID["flux2-klein-9b"],)
    assert "distilled and base" in klein.describe()
    assert "identical" not in ff.identify(*FULL["schnell"][:2]).describe()


def test_tiny_models_are_identified_and_labelled_as_unreleased_sizes():
    klein = ff.identify("Flux2", config(128, 1, 1, guidance_embed=False, in_channels=128))
    assert klein.member.generation == ff.FLUX2 and not klein.member.guidance
    assert not klein.released_size
    assert klein.label.startswith("FLUX.2 [klein] (not a released size: hidden 128, 1 double + 1 single")
    dev = ff.identify("Flux2", config(128, 1, 1, guidance_embed=True, in_channels=128))
    assert dev.member.id == "flux2-dev"
    tiny1 = ff.identify("Flux", config(3072, 1, 1, guidance_embed=True, in_channels=16))
    assert tiny1.label.startswith("FLUX.1 [dev] (not a released size")


@pytest.mark.parametrize("comfy_class", ["SDXL", "ChromaRadiance", "HunyuanVideo", "flux"])
def test_other_architectures_are_refused_naming_what_was_found(comfy_class):
    with pytest.raises(ff.FamilyError, match=f"detects it as {comfy_class}, not a FLUX family model"):
        ff.identify(comfy_class, config(3072, 1, 1), source="x.gguf")


def test_a_flux1_variant_outside_the_members_is_refused():
    # e.g. FLUX.1 Depth/Canny [dev]: ComfyUI's Flux class with 32 input channels
    with pytest.raises(ff.FamilyError, match=r"Flux \(guidance_embed=True, in_channels=32\)"):
        ff.identify("Flux", config(3072, 19, 38, guidance_embed=True, in_channels=32))


def test_klein_is_refused_on_comfyui_0_3_75_naming_0_33_0():
    klein = ff.identify(*FULL["klein4"][:2])
    message = ff.refusal_for_comfyui(klein, (0, 3, 75))
    assert "FLUX.2 [klein] 4B needs ComfyUI 0.33.0 or newer" in message and "0.3.75" in message
    assert ff.refusal_for_comfyui(klein, (0, 33, 0)) is None


def test_on_0_3_75_only_released_widths_any_depth():
    assert ff.refusal_for_comfyui(ff.identify(*FULL["flux2"][:2]), (0, 3, 75)) is None
    tiny = ff.identify("Flux2", config(128, 1, 1, guidance_embed=True))
    assert "needs ComfyUI 0.33.0 or newer at this width" in ff.refusal_for_comfyui(tiny, (0, 3, 75))
    assert ff.refusal_for_comfyui(tiny, (0, 33, 0)) is None
    # the suite's tiny FLUX.1 dev: released width, one block each: both ComfyUIs
    assert ff.refusal_for_comfyui(ff.identify("Flux", config(3072, 1, 1, guidance_embed=True, in_channels=16)),
                                  (0, 3, 75)) is None
    narrow_fill = ff.identify("FluxInpaint", config(128, 1, 1, guidance_embed=True, in_channels=96))
    assert "FLUX.1 Fill [dev]" in ff.refusal_for_comfyui(narrow_fill, (0, 3, 75))
    for name in ("dev", "schnell", "fill", "chroma"):
        assert ff.refusal_for_comfyui(ff.identify(*FULL[name][:2]), (0, 3, 75)) is None


def test_parse_version():
    assert ff.parse_version("0.33.0") == (0, 33, 0)
    assert ff.parse_version("0.3.75") == (0, 3, 75)
    assert ff.parse_version("1.2") == (1, 2, 0)
    assert ff.parse_version("0.3.75") < ff.parse_version("0.33.0")


def test_registry_is_consistent():
    assert len({m.id for m in ff.MEMBERS}) == len(ff.MEMBERS)
    assert len({m.base_model for m in ff.MEMBERS}) == len(ff.MEMBERS)
    for member in ff.MEMBERS:
        assert member.id in member.same_tensors_as or not member.same_tensors_as
        for other in member.same_tensors_as:
            peer = ff.BY_ID[other]
            assert (peer.comfy_class, dict(peer.requires), peer.hidden_size) == (
                member.comfy_class, dict(member.requires), member.hidden_size)
        if member.tiny:  # the tiny model has the member's channels, guidance and pooled input
            assert member.tiny["hidden_size"] % sum(member.tiny["axes_dim"]) == 0
            assert member.tiny["hidden_size"] // sum(member.tiny["axes_dim"]) == member.tiny["num_heads"]
            assert ("vec_in_dim" in member.tiny and member.tiny["vec_in_dim"] is not None) == member.pooled_vector
    assert ff.ALLOWED_COMFY_CLASSES == ("Flux", "FluxSchnell", "FluxInpaint", "Flux2", "Chroma")


def kohya(double, single, extra=()):
    keys = [f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight" for i in range(double)]
    keys += [f"lora_unet_single_blocks_{i}_linear1.lora_down.weight" for i in range(single)]
    return keys + list(extra)


def test_flux1_lora_on_klein_4b_is_refused_by_block_count_though_shapes_fit():
    klein = ff.identify(*FULL["klein4"][:2])
    message = ff.lora_family_mismatch(kohya(19, 38), klein, "style.safetensors")
    assert "style.safetensors targets 19 double and 38 single blocks" in message
    assert "FLUX.2 [klein] 4B" in message and "FLUX.1 [dev]" in message


def test_flux1_lora_on_flux2_is_refused_by_its_modulation_keys():
    flux2 = ff.identify(*FULL["flux2"][:2])
    keys = kohya(2, 2, ["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"])
    message = ff.lora_family_mismatch(keys, flux2, "a.safetensors")
    assert "a.safetensors is a FLUX.1 LoRA" in message and "FLUX.2 [dev] (FLUX.2)" in message


@pytest.mark.parametrize("keys", [
    ["diffusion_model.double_stream_modulation_img.lin.lora_A.weight",
     "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"],
    ["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"],
    ["transformer.transformer_blocks.0.ff.linear_in.lora_A.weight"],
    ["lora_unet_single_stream_modulation_lin.lora_down.weight"],
])
def test_flux2_lora_on_flux1_is_refused_naming_both(keys):
    dev = ff.identify(*FULL["dev"][:2])
    message = ff.lora_family_mismatch(keys, dev, "b.safetensors")
    assert "b.safetensors is a FLUX.2 LoRA" in message and "FLUX.1 [dev]" in message


def lora_shapes(hidden, mlp_rows, mlp_cols, linear1_rows, linear2_cols, double, single, mlp=True, rank=4,
                kohya_names=False):
    """A plain LoRA's key -> shape on the double blocks' attention (and MLP) and the single blocks."""
    modules = {}
    for i in range(double):
        modules[f"double_blocks.{i}.img_attn.qkv"] = (3 * hidden, hidden)
        modules[f"double_blocks.{i}.txt_attn.proj"] = (hidden, hidden)
        if mlp:
            modules[f"double_blocks.{i}.img_mlp.0"] = (mlp_rows, hidden)
            modules[f"double_blocks.{i}.txt_mlp.2"] = (hidden, mlp_cols)
    for i in range(single):
        modules[f"single_blocks.{i}.linear1"] = (linear1_rows, hidden)
        modules[f"single_blocks.{i}.linear2"] = (hidden, linear2_cols)
    shapes = {}
    for module, (rows, cols) in modules.items():
        if kohya_names:
            name = "lora_unet_" + module.replace(".", "_")
            shapes |= {f"{name}.lora_down.weight": (rank, cols), f"{name}.lora_up.weight": (rows, rank)}
        else:
            shapes |= {f"diffusion_model.{module}.lora_A.weight": (rank, cols),
                       f"diffusion_model.{module}.lora_B.weight": (rows, rank)}
    return shapes


# released proportions at klein 4B's and FLUX.1's shared width 3072
# (FLUX.2: SwiGLU of 9216 with gate and value fused; FLUX.1: GELU of 12288)
KLEIN4_SINGLE = dict(hidden=3072, mlp_rows=2 * 9216, mlp_cols=9216, linear1_rows=3 * 3072 + 2 * 9216,
                     linear2_cols=3072 + 9216)
FLUX1_SINGLE = dict(hidden=3072, mlp_rows=4 * 3072, mlp_cols=4 * 3072, linear1_rows=7 * 3072, linear2_cols=5 * 3072)


@pytest.mark.parametrize("kohya_names", [False, True])
def test_klein_lora_within_flux1_block_counts_is_refused_on_flux1_by_its_shapes(kohya_names):
    """5 double + 20 single blocks fit FLUX.1's 19 + 38, no key names a FLUX.2-only layer: the
    single blocks' (and the MLP's) proportions tell klein from FLUX.1."""
    dev = ff.identify(*FULL["dev"][:2])
    for mlp in (True, False):  # attention + single blocks only, and with the MLP
        shapes = lora_shapes(**KLEIN4_SINGLE, double=5, single=20, mlp=mlp, kohya_names=kohya_names)
        message = ff.lora_family_mismatch(shapes.keys(), dev, "klein-style.safetensors", shapes)
        assert "klein-style.safetensors is a FLUX.2 LoRA" in message and "FLUX.1 [dev]" in message, message
        assert "FLUX.2's shapes" in message
    # its MLP alone tells it too (double blocks only)
    shapes = lora_shapes(**KLEIN4_SINGLE, double=5, single=0)
    assert "is a FLUX.2 LoRA" in ff.lora_family_mismatch(shapes.keys(), dev, "k", shapes)
    # and the same file on klein passes
    klein = ff.identify(*FULL["klein4"][:2])
    assert ff.lora_family_mismatch(shapes.keys(), klein, "k", shapes) is None


def test_flux1_lora_within_klein_block_counts_is_refused_on_klein_by_its_shapes():
    klein = ff.identify(*FULL["klein4"][:2])
    shapes = lora_shapes(**FLUX1_SINGLE, double=5, single=20, mlp=False, kohya_names=True)
    message = ff.lora_family_mismatch(shapes.keys(), klein, "flux1-style.safetensors", shapes)
    assert "flux1-style.safetensors is a FLUX.1 LoRA" in message and "FLUX.2 [klein] 4B" in message
    dev, chroma = ff.identify(*FULL["dev"][:2]), ff.identify(*FULL["chroma"][:2])
    assert ff.lora_family_mismatch(shapes.keys(), dev, "f", shapes) is None
    assert ff.lora_family_mismatch(shapes.keys(), chroma, "f", shapes) is None  # Chroma takes FLUX.1's


def test_attention_alone_within_both_block_counts_cannot_be_told_apart():
    """The double blocks' attention is h -> 3h and h -> h in both generations: nothing in such a
    file says which it was trained on, so it is applied as its names say (documented limit)."""
    shapes = lora_shapes(**KLEIN4_SINGLE, double=5, single=0, mlp=False)
    for model in (ff.identify(*FULL["dev"][:2]), ff.identify(*FULL["klein4"][:2])):
        assert ff.lora_family_mismatch(shapes.keys(), model, "a", shapes) is None
    assert ff.lora_evidence(shapes.keys(), shapes) == (set(), 5, 0)


def test_matching_loras_pass():
    dev = ff.identify(*FULL["dev"][:2])
    assert ff.lora_family_mismatch(kohya(19, 38, ["lora_unet_double_blocks_0_img_mod_lin.alpha"]), dev) is None
    diffusers = ["transformer.transformer_blocks.18.norm1.linear.lora_A.weight",
                 "transformer.single_transformer_blocks.37.attn.to_q.lora_A.weight"]
    assert ff.lora_family_mismatch(diffusers, dev) is None
    klein = ff.identify(*FULL["klein4"][:2])
    assert ff.lora_family_mismatch(kohya(5, 20, ["lora_unet_single_stream_modulation_lin.alpha"]), klein) is None
    # Chroma runs FLUX.1 LoRAs (it is schnell-derived); FLUX.2 ones are refused there too
    chroma = ff.identify(*FULL["chroma"][:2])
    assert ff.lora_family_mismatch(kohya(19, 38, ["lora_unet_double_blocks_0_img_mod_lin.alpha"]), chroma) is None
    assert "FLUX.2 LoRA" in ff.lora_family_mismatch(["lora_unet_single_stream_modulation_lin.alpha"], chroma)


def test_block_count_on_models_of_no_released_size():
    tiny_klein = ff.identify("Flux2", config(128, 1, 1, guidance_embed=False, in_channels=128))
    # no FLUX.2 member has 19 double blocks: a FLUX.1 LoRA
    assert "targets 19 double and 38 single blocks" in ff.lora_family_mismatch(kohya(19, 38), tiny_klein)
    # a pruned FLUX.1 (8 double blocks) takes a FLUX.1 [dev] LoRA where its blocks exist
    pruned = ff.identify("Flux", config(3072, 8, 38, guidance_embed=True, in_channels=16))
    assert ff.lora_family_mismatch(kohya(19, 38), pruned) is None
    # released sizes are strict: a klein 9B LoRA on klein 4B
    klein4 = ff.identify(*FULL["klein4"][:2])
    message = ff.lora_family_mismatch(kohya(8, 24, ["lora_unet_single_stream_modulation_lin.alpha"]), klein4)
    assert "FLUX.2 [klein] 9B" in message and "FLUX.2 [klein] 4B with 5 + 20" in message


def test_lora_evidence_counts_diffusers_single_blocks_apart_from_double():
    generations, double, single = ff.lora_evidence(
        ["transformer.single_transformer_blocks.7.proj_out.lora_A.weight",
         "transformer.transformer_blocks.2.attn.to_q.lora_A.weight"])
    assert (generations, double, single) == (set(), 3, 8)


def test_every_member_says_how_it_trains():
    from lora_ops import flow_match

    for member in ff.MEMBERS:
        assert member.train_shift in flow_match.SHIFT_SCHEDULES, member.id
        # FluxQLoadTextEncodersGGUF's types (nodes/comfy_glue/loading.py TEXT_ENCODER_TYPES)
        assert member.text_encoder in ("flux1", "chroma", *ff.TEXT_ENCODERS), member.id
        if member.train_refusal:
            continue
        assert member.train_preset in member.presets, member.id  # samples use one of its own presets
        # a guidance value only where the forward takes one: distilled guidance, or Chroma's zero
        assert (member.train_guidance is not None) == (member.guidance or member.generation == ff.CHROMA), member.id
    by_id = ff.BY_ID
    assert by_id["flux1-dev"].train_guidance == 1.0 and by_id["chroma"].train_guidance == 0.0
    assert by_id["flux2-klein-4b"].train_guidance is None and by_id["flux2-dev"].train_shift == "flux2"
    assert by_id["flux1-fill-dev"].train_refusal


def test_klein_training_says_base_and_warns_on_the_distilled_preset():
    klein = ff.identify(*FULL["klein4"][:2])
    (note,) = ff.training_messages(klein, None)
    assert note.startswith("FLUX.2 [klein] 4B: train klein LoRAs on the klein BASE checkpoint")
    assert ff.training_messages(klein, "flux2-klein-base") == [note]
    note, warning = ff.training_messages(klein, "flux2-klein-distilled")
    assert warning.startswith("warning: the sample preset flux2-klein-distilled says") and "flux2-klein-base" in warning
    assert ff.training_messages(ff.identify(*FULL["dev"][:2]), "flux-dev") == []
