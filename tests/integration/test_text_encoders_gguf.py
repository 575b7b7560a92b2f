"""FluxQLoadTextEncodersGGUF: quantized CLIP-L and the FLUX.2 encoders (llama.cpp GGUFs) encode like
ComfyUI's own classes on the dequantized weights; files that do not fit are refused."""

from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
from comfy_server import ExecutionFailed
from fluxq_testing import TINY, dequantized_state_dict
from safetensors.numpy import load_file


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


# --- FLUX.2 encoders from llama.cpp GGUFs (tests/tiny_encoders.py) ---------------------------------

KLEIN_PROMPT = "a tiny red fox, 35mm"


def comfy_reference_encoder(encoder: str, weights: dict, tekken: bytes | None = None):
    """ComfyUI's own encoder class (``flux2_te`` / ``klein_te``) with the tiny config, on the float
    weights the GGUF holds (quantized and dequantized by the gguf package, HF layout, never permuted),
    and for Mistral the ORIGINAL tekken.json, not the one rebuilt from the file."""
    import comfy.sd
    import comfy.text_encoders.flux as flux_te
    import comfy.utils
    from tiny_encoders import TINY_MISTRAL, TINY_QWEN, quantized_reference

    state = {name: torch.from_numpy(array) for name, array in quantized_reference(weights).items()}
    cfg = TINY_MISTRAL if encoder == "flux2" else TINY_QWEN
    vocab = state["model.embed_tokens.weight"].shape[0]
    config = {"vocab_size": vocab, "hidden_size": cfg.hidden, "intermediate_size": cfg.ffn,
              "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
              "num_key_value_heads": cfg.kv_heads, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta}
    target = type("Target", (), {"params": {}})()
    if encoder == "flux2":
        target.clip, target.tokenizer = flux_te.flux2_te(), flux_te.Flux2Tokenizer
        options, tokenizer_data = {"num_layers": cfg.layers, "mistral3_24b_model_config": config}, {"tekken_model": tekken}
    else:
        target.clip, target.tokenizer = flux_te.klein_te(model_type="qwen3_4b"), flux_te.KleinTokenizer
        options, tokenizer_data = {"qwen3_4b_model_config": config}, {}
    clip = comfy.sd.CLIP(target, parameters=comfy.utils.calculate_parameters(state), tokenizer_data=tokenizer_data,
                         model_options=options)
    missing, unexpected = clip.load_sd(state)
    # The fixture's names are the class's names; below 40 layers ComfyUI's Mistral has no final norm.
    assert not missing and set(unexpected) <= ({"model.norm.weight"} if encoder == "flux2" else set())
    return clip


def encode_flux2(clip, text=KLEIN_PROMPT):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens(tokens), tokens


@pytest.fixture
def fp32_text_encoders(monkeypatch):
    """ComfyUI's ``--fp32-text-enc``: float32 weights in both encoders, so the only difference left is
    where the weights come from (the default fp16 would round the reference's weights and not ours)."""
    from comfy.cli_args import args

    monkeypatch.setattr(args, "fp32_text_enc", True)


def assert_encodes_alike(ours, reference):
    (cond, tokens), (ref_cond, ref_tokens) = encode_flux2(ours), encode_flux2(reference)
    assert tokens == ref_tokens
    assert torch.isfinite(cond).all() and cond.shape == ref_cond.shape and cond.abs().mean() > 0.1
    # Same float32 weights on both sides; a wrong layout (Q/K not un-permuted) is off by O(1).
    torch.testing.assert_close(cond, ref_cond, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_mistral(scratch_models):
    """The tiny Mistral-3 encoder GGUF in the scratch text_encoders folder (the server sees it too)."""
    from tiny_encoders import write_tiny_mistral

    path = scratch_models / "text_encoders" / "fluxq-tiny-mistral3-Q8_0.gguf"
    return path, write_tiny_mistral(path)


def comfy_builds_mistral_tokenizer() -> bool:
    """Whether this ComfyUI builds its own FLUX.2 tokenizer from a tekken.json: 0.3.75 does it through
    transformers' MistralConverter, which transformers 5 (the harness) no longer accepts that way."""
    import comfy.text_encoders.flux as flux_te
    from tiny_encoders import tiny_tekken

    try:
        flux_te.Flux2Tokenizer(tokenizer_data={"tekken_model": tiny_tekken()})
    except TypeError:
        return False
    return True


MISTRAL_TOKENIZER_REFUSED = r"could not build the Mistral-Small .* tokenizer .*; ComfyUI 0.33.0 builds it without transformers"


def test_mistral3_gguf_encodes_like_comfys_flux2_encoder(pack, tiny_mistral, fp32_text_encoders):
    from comfyui_flux_qlora.nodes.comfy_glue import TextEncoderError, load_text_encoders
    from tiny_encoders import tiny_tekken

    path, weights = tiny_mistral
    if not comfy_builds_mistral_tokenizer():
        with pytest.raises(TextEncoderError, match=MISTRAL_TOKENIZER_REFUSED):
            load_text_encoders(str(path), None, "flux2")
        return
    ours = load_text_encoders(str(path), None, "flux2")
    q_proj = ours.cond_stage_model.mistral3_24b.transformer.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.uint8  # stays quantized in memory
    assert_encodes_alike(ours, comfy_reference_encoder("flux2", weights, tiny_tekken()))


def test_flux2_encoder_node_in_the_server_conditions_a_model_like_in_process(comfy_server, pack, tiny_mistral, models_dir):
    """The node with type flux2 in a real server: its conditioning (768 wide, like the tiny FLUX.1's
    text input) drives KSampler to the same latent as the in-process encoder checked above."""
    from comfyui_flux_qlora.nodes.comfy_glue import load_text_encoders
    from fluxq_testing import TINY, sample, saved_latent, tiny_gguf_model

    path, _ = tiny_mistral
    prompt = {
        "te": {"class_type": "FluxQLoadTextEncodersGGUF",
               "inputs": {"clip_name": path.name, "t5_name": "none", "type": "flux2"}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["te", 0], "text": KLEIN_PROMPT}},
        "guid": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": 3.5}},
        "gguf": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY["dev_gguf"]["Q8_0"], "dequant_dtype": "auto"}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["gguf", 0], "positive": ["guid", 0], "negative": ["guid", 0], "latent_image": ["latent", 0],
            "seed": 5, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "flux2_te"}},
    }
    if not comfy_builds_mistral_tokenizer():
        with pytest.raises(ExecutionFailed, match=MISTRAL_TOKENIZER_REFUSED):
            comfy_server.run(prompt)
        return
    served = saved_latent(comfy_server, comfy_server.run(prompt), "save")

    clip = load_text_encoders(str(path), None, "flux2")
    cond, extra = clip.encode_from_tokens_scheduled(clip.tokenize(KLEIN_PROMPT))[0]
    assert cond.shape[-1] == 768
    expected = sample(tiny_gguf_model(models_dir, "Q8_0"), seed=5, positive=[[cond, {**extra, "guidance": 3.5}]])
    assert torch.isfinite(served).all()
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)


def qwen_vocabulary() -> dict[str, int]:
    """ComfyUI's Qwen tokenizer's vocabulary (token -> id), what a real Qwen3 GGUF carries too."""
    import comfy.text_encoders.flux
    from transformers import Qwen2Tokenizer

    folder = Path(comfy.text_encoders.flux.__file__).parent / "qwen25_tokenizer"
    return Qwen2Tokenizer.from_pretrained(str(folder)).get_vocab()


def test_qwen3_gguf_encodes_like_comfys_klein_encoder_or_is_refused_before_0_33(pack, scratch_models, fp32_text_encoders):
    import comfy.sd
    from comfyui_flux_qlora.nodes.comfy_glue import load_text_encoders
    from tiny_encoders import write_tiny_qwen

    path = scratch_models / "text_encoders" / "fluxq-tiny-qwen3-Q8_0.gguf"
    # Without tokenizer.ggml.tokens: gguf's reader takes ~15 s on Qwen's 151k-token vocabulary on
    # CPU; the vocabulary check has its own test below.
    weights = write_tiny_qwen(path)
    if not hasattr(comfy.sd.CLIPType, "FLUX2"):
        with pytest.raises(ValueError, match=r"FLUX.2 \[klein\] text encoder \(Qwen3\) needs ComfyUI 0.33.0"):
            load_text_encoders(str(path), None, "klein")
        return
    ours = load_text_encoders(str(path), None, "klein")
    assert ours.cond_stage_model.qwen3_4b.transformer.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    assert_encodes_alike(ours, comfy_reference_encoder("klein", weights))


def test_a_vocabulary_larger_than_the_embedding_is_refused(pack, tmp_path):
    import comfy.sd
    from comfyui_flux_qlora.nodes.comfy_glue import TextEncoderError, load_text_encoders
    from tiny_encoders import TINY_QWEN, write_tiny_qwen

    if not hasattr(comfy.sd.CLIPType, "FLUX2"):
        pytest.skip("klein's encoder needs ComfyUI 0.33 (its refusal is tested above)")
    path = tmp_path / "qwen3-small-vocab.gguf"
    write_tiny_qwen(path, replace(TINY_QWEN, vocab=1024))
    with pytest.raises(TextEncoderError, match=r"qwen3-small-vocab.gguf: .*token ids up to 1516\d\d, but the file's "
                                               r"token_embd.weight has 1024 rows: vocabulary does not fit"):
        load_text_encoders(str(path), None, "klein")


def test_a_second_file_for_a_single_file_encoder_is_refused(pack, tmp_path):
    from comfyui_flux_qlora.nodes.comfy_glue import TextEncoderError, load_text_encoders

    with pytest.raises(TextEncoderError, match=r"type flux2: the encoder goes in clip_name alone; set t5_name to 'none' \(got t5.gguf\)"):
        load_text_encoders(str(tmp_path / "mistral.gguf"), str(tmp_path / "t5.gguf"), "flux2")


def test_t5_alone_for_chroma_encodes_like_comfys_chroma_encoder(pack, scratch_models, fp32_text_encoders):
    """type chroma: T5 alone through ``CLIPType.CHROMA`` (PixArt's T5 encoder: no padding to 256
    tokens, unlike FLUX.1's), its config from the llama.cpp file's metadata."""
    import comfy.sd
    from comfyui_flux_qlora.lora_ops.gguf_file import t5_name_from_llama_cpp
    from comfyui_flux_qlora.nodes.comfy_glue import load_text_encoders
    from tiny_encoders import TINY_T5, write_tiny_t5

    path = scratch_models / "text_encoders" / "fluxq-tiny-t5-Q8_0.gguf"
    write_tiny_t5(path)
    dequantized = {t5_name_from_llama_cpp(k): v for k, v in dequantized_state_dict(path).items()}
    if comfy.sd.detect_te_model(dequantized) != comfy.sd.TEModel.T5_XXL:
        pytest.skip("this ComfyUI (0.3.75) recognises T5-XXL by its 4096-wide model dimension, which no tiny T5 has")
    ours = load_text_encoders(str(path), None, "chroma")
    assert ours.cond_stage_model.t5xxl.transformer.encoder.block[0].layer[1].DenseReluDense.wi_1.weight.dtype == torch.uint8
    reference = comfy.sd.load_text_encoder_state_dicts(
        [dequantized], clip_type=comfy.sd.CLIPType.CHROMA, model_options={"t5xxl_model_config": TINY_T5})
    tokens, ref_tokens = ours.tokenize(KLEIN_PROMPT), reference.tokenize(KLEIN_PROMPT)
    assert tokens == ref_tokens and len(tokens["t5xxl"][0]) < 256  # PixArt's tokenizer, not FLUX.1's padded one
    cond, ref_cond = ours.encode_from_tokens(tokens), reference.encode_from_tokens(ref_tokens)
    assert cond.shape == (1, len(tokens["t5xxl"][0]), 32) and cond.abs().mean() > 0.01
    torch.testing.assert_close(cond, ref_cond, rtol=1e-5, atol=1e-5)


def test_a_file_whose_vocabulary_is_not_the_tokenizers_is_refused(pack, tmp_path):
    import comfy.sd
    from comfyui_flux_qlora.nodes.comfy_glue import TextEncoderError, load_text_encoders
    from tiny_encoders import TINY_QWEN, write_tiny_qwen

    if not hasattr(comfy.sd.CLIPType, "FLUX2"):
        pytest.skip("klein's encoder needs ComfyUI 0.33 (its refusal is tested above)")
    vocabulary = qwen_vocabulary()
    swapped = {token: {100: 101, 101: 100}.get(i, i) for token, i in vocabulary.items()}  # two ids exchanged
    path = tmp_path / "other-vocab.gguf"
    write_tiny_qwen(path, replace(TINY_QWEN, vocab=1024), vocabulary=swapped)  # checked before the embedding's size
    with pytest.raises(TextEncoderError, match=r"other-vocab.gguf: the file's vocabulary is not the Qwen3 .* tokenizer's: "
                                               r"token 100 is '.+' in the file but '.+' in the tokenizer"):
        load_text_encoders(str(path), None, "klein")
