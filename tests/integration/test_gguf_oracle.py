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
