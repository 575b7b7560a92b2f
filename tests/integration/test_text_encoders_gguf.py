"""FluxQLoadTextEncodersGGUF: a quantized CLIP-L encodes like core on its dequantized weights."""

import gguf
import torch
from safetensors.numpy import load_file

from fluxq_testing import TINY
from fluxq_testing import dequantized_state_dict


def encode(clip, text="a tiny random test"):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond, pooled


def test_quantized_clip_l_encodes_like_core(pack, models_dir, scratch_models):
    import comfy.sd
    from comfyui_flux_qlora.lora_ops.gguf_write import write_gguf
    from comfyui_flux_qlora.nodes.comfy_glue import load_text_encoders

    weights = load_file(str(models_dir / "text_encoders" / TINY["clip_l"]))

    def q8_for_matrices(name, array):
        return gguf.GGMLQuantizationType.Q8_0 if array.ndim == 2 and array.shape[1] % 32 == 0 else gguf.GGMLQuantizationType.F32

    path = scratch_models / "text_encoders" / "clip_l-Q8_0.gguf"
    write_gguf(path, weights, q8_for_matrices, arch="clip")

    ours = load_text_encoders(str(path), None)
    fc1 = ours.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1
    assert fc1.weight.dtype == torch.uint8  # linear weights stay quantized in memory

    reference = comfy.sd.load_text_encoder_state_dicts(
        [dequantized_state_dict(path)], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    (cond, pooled), (ref_cond, ref_pooled) = encode(ours), encode(reference)
    assert torch.isfinite(cond).all()
    # ComfyUI stores text encoders as fp16 on CPU: the reference's weights are the dequantized
    # values rounded to fp16, ours are dequantized straight to the compute dtype.
    for value, expected in ((cond, ref_cond), (pooled, ref_pooled)):
        torch.testing.assert_close(value, expected, rtol=1e-2, atol=5e-3)
        assert (value - expected).abs().mean() < 1e-3  # values are O(1); a wrong dequantization is off by O(1)
