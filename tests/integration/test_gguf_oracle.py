"""FluxQLoadGGUF against core ComfyUI on the same weights: sampled latents must match."""

import pytest
import torch

from fluxq_testing import sample, tiny_gguf_model, tiny_gguf_path, tiny_reference_model


# F32 files are covered by the dequantization unit tests and the server test; here the float
# path (F16), a legacy block type (Q8_0) and a K-quant (Q4_K) run the whole sampler.
@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K"])
def test_gguf_model_samples_like_core_on_dequantized_weights(pack, models_dir, qtype):
    ours = sample(tiny_gguf_model(models_dir, qtype), steps=2)
    reference = sample(tiny_reference_model(models_dir, qtype), steps=2)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_weights_stay_quantized_in_memory(pack, models_dir):
    from comfyui_flux_qlora.lora_ops.gguf_file import read_gguf

    path = tiny_gguf_path(models_dir, "Q8_0")
    model = tiny_gguf_model(models_dir, "Q8_0")
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.uint8 and qkv.qshape == (9216, 3072)
    assert qkv.weight.numel() == 9216 * 3072 // 32 * 34  # Q8_0: 34 bytes per block of 32
    n_weights = sum(torch.Size(t.shape).numel() for t in read_gguf(str(path)).tensors.values())
    # resident size is the file's (~1.1 bytes a weight here), far from bf16's 2 or fp32's 4
    assert model.model_size() < 1.3 * n_weights


def test_partial_lowvram_load_with_core_lora_matches_full_load(pack, models_dir):
    """ComfyUI's partial loading (every layer lowvram: weights cast per call, core LoRA patches as
    LowVramPatch weight functions) and partial unloading give what a full load gives, and
    unpatching leaves no patch."""
    import comfy.sd

    base = tiny_gguf_model(models_dir, "Q8_0")
    layers = [n for n, m in base.model.diffusion_model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("double_blocks.0.img_attn")]
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name in layers:
        layer = base.model.diffusion_model.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        lora[key + ".lora_down.weight"] = torch.randn(4, layer.in_features, generator=g) / layer.in_features ** 0.5
        lora[key + ".lora_up.weight"] = 0.3 * torch.randn(layer.out_features, 4, generator=g)
    patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)

    x = torch.randn(1, 16, 8, 8, generator=g)
    cond, pooled = torch.randn(1, 77, 768, generator=g), torch.randn(1, 768, generator=g)

    def denoise():
        return patched.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond, y=pooled, guidance=torch.tensor([3.5]))

    patched.load(torch.device("cpu"), lowvram_model_memory=1)
    assert patched.model.model_lowvram
    partial = denoise()
    patched.unpatch_model()
    patched.load(torch.device("cpu"), full_load=True)
    full = denoise()
    # loading again (ComfyUI does when memory frees up) wipes weight functions: the patch must stay
    patched.load(torch.device("cpu"), full_load=True)
    reloaded = denoise()
    # ComfyUI frees memory by moving loaded layers back to lowvram: the patch must not double
    patched.partially_unload(torch.device("cpu"), memory_to_free=1 << 40)
    unloaded = denoise()
    patched.unpatch_model()
    base_out = base.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond, y=pooled, guidance=torch.tensor([3.5]))

    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reloaded, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unloaded, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, base_out, atol=1e-4)  # the LoRA was applied
    qkv = base.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert qkv.weight_function == [] and qkv.core_patch is None and qkv.weight.dtype == torch.uint8


def test_quantized_linear_with_lora_compiles_as_one_graph(pack, tmp_path):
    """TorchCompileModel users: a GGUF layer plus its runtime LoRA trace without graph breaks."""
    import gguf

    from comfyui_flux_qlora.lora_ops.gguf_file import read_gguf
    from comfyui_flux_qlora.lora_ops.gguf_write import write_gguf
    from comfyui_flux_qlora.lora_ops.lora_runtime import LoraEntry, LoraStack, LowRankAdapter, activate, install_hooks
    from comfyui_flux_qlora.nodes.comfy_glue import make_ops

    g = torch.Generator().manual_seed(0)
    path = tmp_path / "layer.gguf"
    write_gguf(path, {"layer.weight": torch.randn(96, 64, generator=g).numpy()},
               lambda name, array: gguf.GGMLQuantizationType.Q8_0)
    model = torch.nn.Module()
    model.layer = make_ops(None).Linear(64, 96, bias=False)
    model.layer.load_state_dict({"weight": read_gguf(path).tensors["layer.weight"]})
    install_hooks(model, ["layer"])
    stack = LoraStack([LoraEntry("a", 0.5, {"layer": (LowRankAdapter(torch.randn(4, 64), torch.randn(96, 4), 1.0),)})])
    x = torch.randn(3, 64, generator=g)
    with torch.no_grad(), activate(stack, root=model):
        eager = model.layer(x)
        compiled = torch.compile(model.layer, fullgraph=True)(x)
    assert model.layer.weight.dtype == torch.uint8
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
