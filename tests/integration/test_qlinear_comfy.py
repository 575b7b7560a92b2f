"""The quantized-linear plans inside ComfyUI: resident mode against streaming, and core's
torch.compile helper (what TorchCompileModel runs) on FluxQ blocks with runtime LoRAs."""

import torch

from fluxq_testing import tiny_gguf_path

LORA_PATHS = ("double_blocks.0.img_mod.lin", "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0",
              "single_blocks.0.linear1", "single_blocks.0.modulation.lin")


def _entry(diffusion_model, name="tiny", strength=1.0, seed=0):
    from comfyui_flux_qlora.lora_ops.lora_runtime import LoraEntry, LowRankAdapter

    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for path in LORA_PATHS:
        layer = diffusion_model.get_submodule(path)
        down = torch.randn(8, layer.in_features, generator=g) / layer.in_features ** 0.5
        adapters[path] = (LowRankAdapter(down, 0.05 * torch.randn(layer.out_features, 8, generator=g), 1.0),)
    return LoraEntry(name, strength, adapters)


def _denoise(model, seed=3):
    """One model call the way the sampler makes it (APPLY_MODEL wrappers included)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    cond, pooled = torch.randn(1, 77, 768, generator=g), torch.randn(1, 768, generator=g)
    options = {**model.model_options["transformer_options"], "wrappers": model.wrappers}  # as sampler_helpers does
    with torch.inference_mode():
        return model.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond, y=pooled, guidance=torch.tensor([3.5]),
                                       transformer_options=options)


def _fresh_model(models_dir, **options):
    """A model of its own: ``_denoise`` calls the model directly, so a shared (cached) one would
    run with whatever core patches another test's loaded clone left on its layers."""
    from comfyui_flux_qlora.nodes.comfy_glue import load_flux_gguf

    return load_flux_gguf(str(tiny_gguf_path(models_dir, "Q8_0")), **options)


def _quantized_layers(model):
    return {n: m for n, m in model.model.diffusion_model.named_modules() if getattr(m, "qtype", None) is not None}


def test_resident_mode_equals_streaming_and_rebuilds_on_stack_changes(pack, models_dir):
    from comfyui_flux_qlora.nodes.comfy_glue import with_lora_stack
    from comfyui_flux_qlora.lora_ops.lora_runtime import LoraStack

    streaming = _fresh_model(models_dir)  # resident 'auto': off on the CPU
    resident = _fresh_model(models_dir, resident="on")
    entry = _entry(resident.model.diffusion_model)
    outputs = {}
    for label, model in (("streaming", streaming), ("resident", resident)):
        with_lora = with_lora_stack(model, LoraStack([entry]))
        outputs[label] = [_denoise(m) for m in (model, with_lora)]
    outputs["resident"] += [_denoise(with_lora_stack(with_lora, stack)) for stack in (
        LoraStack([entry]).with_strength(entry.name, 0.0), LoraStack([entry]).without("all"))]
    assert all(m.resident is None for m in _quantized_layers(streaming).values())
    layers = _quantized_layers(resident)
    assert [name for name, m in layers.items() if m.resident is None] == []
    resident_bytes = sum(m.resident.nbytes for m in layers.values())
    assert resident_bytes == sum(m.weight.numel() for m in layers.values()) // 34 * 32 * 4  # fp32 copies of Q8_0 weights
    base, lora, zero, removed = outputs["resident"]
    # Stack changes rebuild the copies from the quantized bytes: strength 0 and removal are the base, bit for bit.
    assert torch.equal(zero, base) and torch.equal(removed, base) and not torch.allclose(lora, base, atol=1e-4)
    # Streaming runs the modulations as a chunked GEMV (another summation order than the resident
    # F.linear); everything else is the same arithmetic.
    for ours, theirs in zip(outputs["resident"], outputs["streaming"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    resident.detach()  # ComfyUI unloading the model frees the copies
    assert all(m.resident is None for m in layers.values())


def test_core_torch_compile_on_fluxq_blocks_with_lora_no_recompile_on_strength_change(pack, models_dir):
    """Core's set_torch_compile_wrapper (the body of TorchCompileModel), inductor.

    Only the two blocks of the tiny model are compiled, not the whole diffusion model: they hold
    every quantized layer kind (fused qkv, MLPs, one-token modulations) and compiling the whole
    model costs minutes on a 2-core CPU runner; the code around the blocks is ComfyUI's.
    Not fullgraph: ComfyUI 0.3.75's own CPU attention (comfy/ldm/flux/math.py) breaks the graph
    (it calls ``open``); that the pack's layers trace as one graph is test_qlinear.py's and
    test_gguf_oracle.py's fullgraph tests."""
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from comfyui_flux_qlora.lora_ops.lora_runtime import LoraStack
    from comfyui_flux_qlora.nodes.comfy_glue import with_lora_stack

    base = _fresh_model(models_dir)
    entry = _entry(base.model.diffusion_model, strength=0.8)
    eager = {s: _denoise(with_lora_stack(base, LoraStack([entry]).with_strength(entry.name, s))) for s in (0.8, -0.3)}
    eager_base = _denoise(base)

    torch._dynamo.reset()
    compiled_base = base.clone()
    set_torch_compile_wrapper(compiled_base, backend="inductor",
                              keys=["diffusion_model.double_blocks.0", "diffusion_model.single_blocks.0"])
    torch.testing.assert_close(_denoise(compiled_base), eager_base, rtol=1e-4, atol=1e-4)
    with_lora = with_lora_stack(compiled_base, LoraStack([entry]))
    torch.testing.assert_close(_denoise(with_lora), eager[0.8], rtol=1e-4, atol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        restrengthened = with_lora_stack(with_lora, LoraStack([entry]).with_strength(entry.name, -0.3))
        torch.testing.assert_close(_denoise(restrengthened), eager[-0.3], rtol=1e-4, atol=1e-4)


def _block_inputs(model):
    """The arguments the sampler's model call passes to double_blocks.0, captured from one call."""
    block = model.model.diffusion_model.double_blocks[0]
    captured = {}

    def capture(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _denoise(model)
    finally:
        handle.remove()
    return block, captured["args"], captured["kwargs"]


def _mixed_kinds(diffusion_model, seed):
    """A LoRA, a LoHa and a LoKr entry on the layers of double_blocks.0."""
    from comfyui_flux_qlora.lora_ops.lora_runtime import (
        KroneckerAdapter,
        LoraEntry,
        LowRankAdapter,
        hadamard_as_low_rank,
    )

    g = torch.Generator().manual_seed(seed)
    paths = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin", "double_blocks.0.txt_mlp.0")
    loha, lokr = {}, {}
    for path in paths:
        layer = diffusion_model.get_submodule(path)
        out, inp = layer.out_features, layer.in_features
        factors = (torch.randn(*s, generator=g) * 0.02 for s in ((out, 2), (2, inp), (out, 3), (3, inp)))
        down, up = hadamard_as_low_rank(*factors)
        loha[path] = (LowRankAdapter(down, up, scale=0.5),)
        lokr[path] = (KroneckerAdapter(torch.randn(out // 64, 4, generator=g) * 0.05,
                                       torch.randn(64, inp // 4, generator=g) * 0.05, scale=0.5),)
    lora = _entry(diffusion_model, name="lora", seed=seed)
    return [lora, LoraEntry("loha", 0.6, loha), LoraEntry("lokr", -0.4, lokr)]


def test_one_flux_block_compiles_as_one_graph_with_0_1_and_3_loras_of_mixed_kinds(pack, models_dir, monkeypatch):
    """torch.compile(fullgraph=True) of a whole FLUX double block (fused qkv, MLP, one-token
    modulation; ComfyUI's attention included) with quantized layers: no LoRA, one, and a LoRA +
    LoHa + LoKr; each equals eager, and a strength change on all three is not a recompile."""
    import dataclasses

    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import torch._dynamo

    # ComfyUI's PyTorch attention, what --use-pytorch-cross-attention (and every GPU) selects: its
    # CPU default reads the free memory (psutil opens a file), which no fullgraph trace allows.
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)

    from comfyui_flux_qlora.lora_ops.lora_runtime import LoraStack, activate, install_hooks
    from comfyui_flux_qlora.nodes.comfy_glue import layer_base_weight

    model = _fresh_model(models_dir)
    block, args, kwargs = _block_inputs(model)
    diffusion_model = model.model.diffusion_model
    entries = _mixed_kinds(diffusion_model, seed=4)
    install_hooks(diffusion_model, LoraStack(entries).module_paths(), layer_base_weight)
    img = args[0] if args else kwargs["img"]  # ComfyUI passes the block's inputs by name
    dtype, device = img.dtype, img.device
    stacks = {"no LoRA": LoraStack(), "one LoRA": LoraStack(entries[:1]), "three kinds": LoraStack(entries),
              "three kinds, new strengths": LoraStack([dataclasses.replace(e, strength=-e.strength) for e in entries])}
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="inductor")

    def fresh(values):
        return [v.clone() if isinstance(v, torch.Tensor) else v for v in values]

    outputs = {}
    with torch.inference_mode():
        for label, stack in stacks.items():
            with activate(stack, device, dtype, root=diffusion_model), \
                    torch._dynamo.config.patch(error_on_recompile=label == "three kinds, new strengths"):
                # Fresh inputs per call: the block adds its residuals into img and txt in place.
                eager, ours = (run(*fresh(args), **dict(zip(kwargs, fresh(kwargs.values()))))
                               for run in (block, compiled))
            for got, want in zip(ours, eager):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=label)
            outputs[label] = ours
    # The LoHa and LoKr terms were applied (small, but not nothing), under compile too.
    assert not torch.equal(outputs["three kinds"][0], outputs["one LoRA"][0])
