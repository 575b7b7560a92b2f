"""Runtime LoRA on the GGUF model against core ComfyUI's merged LoRA on the same weights.

Every file format is written from the same random low-rank factors; core ComfyUI loads the
kohya twin of each on an unquantized copy of the weights, and the sampled latents must match.
"""

import pytest
import torch
from safetensors.torch import save_file

from fluxq_testing import sample, tiny_gguf_model, tiny_reference_model

RANK = 4
XLABS_NAMES = {
    "double_blocks.0.img_attn.qkv": "double_blocks.0.processor.qkv_lora1",
    "double_blocks.0.img_attn.proj": "double_blocks.0.processor.proj_lora1",
    "double_blocks.0.txt_attn.qkv": "double_blocks.0.processor.qkv_lora2",
    "double_blocks.0.txt_attn.proj": "double_blocks.0.processor.proj_lora2",
}


def random_factors(diffusion_model, module_paths, seed):
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in module_paths:
        layer = diffusion_model.get_submodule(path)
        down = torch.randn(RANK, layer.in_features, generator=g) / layer.in_features ** 0.5
        up = 0.3 * torch.randn(layer.out_features, RANK, generator=g)
        factors[path] = (down, up)
    return factors


def kohya_file(factors, alpha):
    sd = {}
    for path, (down, up) in factors.items():
        name = "lora_unet_" + path.replace(".", "_")
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(float(alpha))}
    return sd


def bfl_file(factors):
    sd = {}
    for path, (down, up) in factors.items():
        sd |= {f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up}
    return sd


def xlabs_file(factors):
    sd = {}
    for path, (down, up) in factors.items():
        sd |= {f"{XLABS_NAMES[path]}.down.weight": down, f"{XLABS_NAMES[path]}.up.weight": up}
    return sd


# Real diffusers FLUX.1 module names (FluxTransformer2DModel), written out rather than taken from
# comfy.utils.flux_to_diffusers, the map under test (ComfyUI 0.33's also holds LyCORIS and FLUX.2
# aliases of the same weights): diffusers module -> (BFL module, first row, rows), rows in units of
# the hidden size for the parts of BFL's fused qkv / linear1.
DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 1), "attn.to_k": ("img_attn.qkv", 1, 1), "attn.to_v": ("img_attn.qkv", 2, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 1), "attn.add_k_proj": ("txt_attn.qkv", 1, 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 1),
    "attn.to_out.0": ("img_attn.proj", None, None), "attn.to_add_out": ("txt_attn.proj", None, None),
    "ff.net.0.proj": ("img_mlp.0", None, None), "ff.net.2": ("img_mlp.2", None, None),
    "ff_context.net.0.proj": ("txt_mlp.0", None, None), "ff_context.net.2": ("txt_mlp.2", None, None),
    "norm1.linear": ("img_mod.lin", None, None), "norm1_context.linear": ("txt_mod.lin", None, None),
}
DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", 0, 1), "attn.to_k": ("linear1", 1, 1), "attn.to_v": ("linear1", 2, 1),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", None, None), "norm.linear": ("modulation.lin", None, None),
}


def diffusers_file(factors, hidden_size):
    """PEFT/ai-toolkit names; fused BFL layers split into their diffusers parts (row slices of B)."""
    sd = {}
    for prefix, bfl_prefix, parts in (("transformer_blocks", "double_blocks", DIFFUSERS_DOUBLE),
                                      ("single_transformer_blocks", "single_blocks", DIFFUSERS_SINGLE)):
        for path, (down, up) in factors.items():
            if not path.startswith(bfl_prefix + "."):
                continue
            block, bfl_module = path[len(bfl_prefix) + 1:].split(".", 1)
            for diffusers_module, (target, first, rows) in parts.items():
                if target != bfl_module:
                    continue
                part = up if first is None else up[first * hidden_size: (first + rows) * hidden_size]
                name = f"transformer.{prefix}.{block}.{diffusers_module}"
                sd |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": part.contiguous()}
    return sd


@pytest.fixture(scope="module")
def models(pack, models_dir):
    return tiny_gguf_model(models_dir, "F16"), tiny_reference_model(models_dir, "F16")


def all_block_linears(diffusion_model):
    return [name for name, m in diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))]


def write_lora(scratch_models, name, sd):
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(scratch_models / "loras" / name))
    return name


def apply_ours(model, lora_name, strength):
    from comfyui_flux_qlora.nodes.comfy_glue import get_lora_stack, load_lora_entry, with_lora_stack

    entry, _, report = load_lora_entry(model, lora_name, strength)
    return with_lora_stack(model, get_lora_stack(model).with_lora(entry)), report


def apply_core(model, lora_sd, strength):
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0)
    return patched


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "xlabs", "bfl"])
def test_runtime_lora_matches_core_merge(models, scratch_models, fmt):
    ours_base, reference_base = models
    diffusion_model = ours_base.model.diffusion_model
    paths = list(XLABS_NAMES) if fmt == "xlabs" else all_block_linears(diffusion_model)
    factors = random_factors(diffusion_model, paths, seed=len(fmt))
    if fmt == "kohya":
        lora_sd, reference_sd = kohya_file(factors, alpha=RANK / 2), kohya_file(factors, alpha=RANK / 2)
    else:
        writer = {"bfl": bfl_file, "xlabs": xlabs_file,
                  "diffusers": lambda f: diffusers_file(f, diffusion_model.hidden_size)}[fmt]
        lora_sd, reference_sd = writer(factors), kohya_file(factors, alpha=RANK)  # no alpha in file = scale 1
    lora_name = write_lora(scratch_models, f"oracle-{fmt}.safetensors", lora_sd)

    for strength in (1.0, 0.5, -0.7):
        ours, report = apply_ours(ours_base, lora_name, strength)
        assert f"{len(paths)} modules matched, 0 keys unmatched" in report
        expected = sample(apply_core(reference_base, reference_sd, strength))
        torch.testing.assert_close(sample(ours), expected, rtol=2e-4, atol=2e-4)


def test_strength_zero_and_removal_are_bit_exact(models, scratch_models):
    from comfyui_flux_qlora.nodes.comfy_glue import get_lora_stack, with_lora_stack

    base, _ = models
    factors = random_factors(base.model.diffusion_model, all_block_linears(base.model.diffusion_model), seed=5)
    name = write_lora(scratch_models, "exact.safetensors", kohya_file(factors, RANK))
    baseline = sample(base)

    zero, _ = apply_ours(base, name, 0.0)
    assert torch.equal(sample(zero), baseline)

    applied, _ = apply_ours(base, name, 1.0)
    assert not torch.allclose(sample(applied), baseline)
    removed = with_lora_stack(applied, get_lora_stack(applied).without(name))
    assert torch.equal(sample(removed), baseline)
    assert torch.equal(sample(base), baseline)  # the upstream model never changed


def test_two_stacked_loras_match_core_stack(models, scratch_models):
    ours_base, reference_base = models
    linears = all_block_linears(ours_base.model.diffusion_model)
    first = random_factors(ours_base.model.diffusion_model, linears, seed=11)
    second = random_factors(ours_base.model.diffusion_model, linears[::2], seed=12)
    name_a = write_lora(scratch_models, "stack-a.safetensors", kohya_file(first, RANK))
    name_b = write_lora(scratch_models, "stack-b.safetensors",
                        diffusers_file(second, ours_base.model.diffusion_model.hidden_size))

    ours, _ = apply_ours(ours_base, name_a, 0.8)
    ours, _ = apply_ours(ours, name_b, -0.5)
    reference = apply_core(apply_core(reference_base, kohya_file(first, RANK), 0.8), kohya_file(second, RANK), -0.5)
    torch.testing.assert_close(sample(ours), sample(reference), rtol=2e-4, atol=2e-4)


def test_quantized_model_with_lora_matches_dequantized_reference(pack, models_dir, scratch_models):
    ours_base, reference_base = tiny_gguf_model(models_dir, "Q8_0"), tiny_reference_model(models_dir, "Q8_0")
    factors = random_factors(ours_base.model.diffusion_model, all_block_linears(ours_base.model.diffusion_model), 21)
    name = write_lora(scratch_models, "q8.safetensors", kohya_file(factors, RANK))

    ours, _ = apply_ours(ours_base, name, 0.9)
    expected = sample(apply_core(reference_base, kohya_file(factors, RANK), 0.9))
    torch.testing.assert_close(sample(ours), expected, rtol=2e-4, atol=2e-4)

    # core's own LoRA loader on the GGUF model keeps working (patches run after dequantization)
    core_on_gguf = apply_core(ours_base, kohya_file(factors, RANK), 0.9)
    torch.testing.assert_close(sample(core_on_gguf), expected, rtol=2e-4, atol=2e-4)
    assert ours_base.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8
