"""The LoRA workbench nodes inside a real ComfyUI server: a merged LoRA loads in core and in this pack
with the effect of the LoRAs it merges; a baked GGUF samples like its base with the runtime LoRA."""

import pytest
import torch

from comfy_server import ExecutionFailed
from fluxq_testing import TINY, comfyui_version, saved_latent

Q8 = TINY["dev_gguf"]["Q8_0"]
MERGED = "fluxq-test-merged.safetensors"
RESIZED = "fluxq-test-resized.safetensors"
BAKED = "fluxq-test-baked-Q8_0.gguf"


def one_step(model_ref, prefix, seed=3):
    """Core text encoding, KSampler (1 step: every step reads the tiny model's ~535M weights), SaveLatent."""
    return {
        f"{prefix}_ks": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["guid", 0], "negative": ["guid", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_ks", 0], "filename_prefix": prefix}},
    }


def common(gguf_name=Q8):
    return {
        "gguf": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": gguf_name, "dequant_dtype": "auto"}},
        "te": {"class_type": "FluxQLoadTextEncodersGGUF", "inputs": {"clip_name": TINY["clip_l"], "t5_name": "none"}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["te", 0], "text": "a tiny random test"}},
        "guid": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": 3.5}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def apply(node_id, model_ref, lora, strength):
    return {node_id: {"class_type": "FluxQApplyLoRA", "inputs": {
        "model": model_ref, "lora_name": lora, "strength_model": strength, "strength_clip": 1.0}}}


def removed_afterwards(paths):
    """Files the nodes write into the server's first model folders: none there before, removed after."""
    for path in paths:
        assert not path.exists(), f"{path} left over from an earlier run"
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def written(models_dir):
    yield from removed_afterwards([models_dir / "loras" / MERGED, models_dir / "loras" / RESIZED,
                                   models_dir / "diffusion_models" / BAKED])


def test_merged_lora_has_the_effect_of_its_parts_in_core_and_in_the_pack(comfy_server, written):
    merge = {"merge": {"class_type": "FluxQMergeLoRAs", "inputs": {
        "model": ["gguf", 0], "lora_1": TINY["lora"], "weight_1": 0.7, "lora_2": TINY["lora_b"], "weight_2": -0.4,
        "lora_3": "none", "weight_3": 1.0, "lora_4": "none", "weight_4": 1.0, "mode": "exact (concatenate ranks)",
        "rank": 32, "save_name": MERGED, "save_dtype": "float32", "overwrite": False}},
        "resize": {"class_type": "FluxQResizeLoRA", "inputs": {
            "model": ["gguf", 0], "lora_name": TINY["lora"], "mode": "fixed rank", "rank": 2, "kept_fraction": 0.9,
            "save_name": RESIZED, "save_dtype": "bfloat16", "overwrite": False}}}
    history = comfy_server.run({**common(), **merge})
    merge_report = history["outputs"]["merge"]["text"][0]
    assert merge_report.startswith(f"{MERGED}: ") and "rank 8" in merge_report and "mean 0," in merge_report
    resize_report = history["outputs"]["resize"]["text"][0]
    assert "rank 2" in resize_report and "mean 0," not in resize_report  # rank 4 -> 2 loses something

    prompt = {
        **common(),
        **apply("a", ["gguf", 0], TINY["lora"], 0.7), **apply("ab", ["a", 0], TINY["lora_b"], -0.4),
        **apply("merged", ["gguf", 0], MERGED, 1.0),
        "core": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["gguf", 0], "lora_name": MERGED,
                                                                 "strength_model": 1.0}},
        **one_step(["gguf", 0], "base"), **one_step(["ab", 0], "stack"), **one_step(["merged", 0], "merged"),
        **one_step(["core", 0], "core"),
    }
    history = comfy_server.run(prompt)
    latent = {name: saved_latent(comfy_server, history, f"{name}_save") for name in ("base", "stack", "merged", "core")}
    torch.testing.assert_close(latent["merged"], latent["stack"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latent["core"], latent["stack"], rtol=2e-4, atol=2e-4)
    assert not torch.allclose(latent["stack"], latent["base"], atol=1e-3)
    assert "0 keys unmatched" in history["outputs"]["merged"]["text"][0]

    # no overwrite without the switch (the node is not cached: the last prompt did not hold it)
    with pytest.raises(ExecutionFailed, match=f"{MERGED} exists"):
        comfy_server.run({**common(), "merge": merge["merge"]})


def test_baked_gguf_samples_like_the_runtime_lora(comfy_server, written):
    """One graph: the bake's MODEL output (the written file, loaded) against base + runtime LoRA
    (with block weights: the bake writes the layers at strength x block weight)."""
    lora = apply("lora", ["gguf", 0], TINY["lora"], 0.8)
    lora["lora"]["inputs"]["block_weights"] = "s0=0.5"
    bake = {**common(), **lora,
            "bake": {"class_type": "FluxQSaveGGUF", "inputs": {
                "model": ["lora", 0], "gguf_type": "Q8_0", "save_name": BAKED, "overwrite": False}}}
    prompt = {**bake, **one_step(["gguf", 0], "base"), **one_step(["lora", 0], "runtime"),
              **one_step(["bake", 0], "baked")}
    history = comfy_server.run(prompt)
    report = history["outputs"]["bake"]["text"][0]
    assert report.startswith(BAKED) and "at 0.8 (block weights s*=0.5)" in report and written[2].exists()
    latent = {name: saved_latent(comfy_server, history, f"{name}_save") for name in ("base", "runtime", "baked")}
    effect = torch.linalg.norm(latent["runtime"] - latent["base"])
    baked_error = torch.linalg.norm(latent["baked"] - latent["runtime"])
    # Re-quantizing Q8_0 weights (+ the LoRA) to Q8_0 costs at most half a Q8_0 step per weight:
    # far below the LoRA's own effect, which the baked file must carry.
    assert effect > 1e-2
    assert baked_error < 0.05 * effect, (float(baked_error), float(effect))

    # another type (a cached node would not run again), same name: refused before any work
    again = {**bake, "bake": {**bake["bake"], "inputs": {**bake["bake"]["inputs"], "gguf_type": "Q4_0"}}}
    with pytest.raises(ExecutionFailed, match=f"{BAKED} exists"):
        comfy_server.run(again)
    unknown = {**bake, "bake": {**bake["bake"], "inputs": {**bake["bake"]["inputs"], "gguf_type": "Q4_K_M",
                                                           "save_name": "never-written"}}}
    # refused at validation (0.3.75: the node's own check; 0.33 also checks combo values itself)
    with pytest.raises(ExecutionFailed, match="validation failed.*gguf_type.*'Q4_K_M'"):
        comfy_server.run(unknown)
    assert not (written[2].parent / "never-written.gguf").exists()


FLUX2 = "fluxq-tiny-flux2-dev-Q8_0.gguf"
FLUX2_LORA = "fluxq-tiny-flux2-lora.safetensors"


@pytest.fixture()
def flux2_written(models_dir):
    yield from removed_afterwards([models_dir / "loras" / "fluxq-test-flux2-merged.safetensors",
                                   models_dir / "diffusion_models" / "fluxq-test-flux2-baked-Q8_0.gguf",
                                   models_dir / "loras" / "fluxq-test-flux2-resized.safetensors",
                                   models_dir / "loras" / "fluxq-test-flux2-extracted.safetensors"])


def test_merge_and_bake_on_flux2_dev(comfy_server, flux2_written):
    """The workbench on a FLUX.2 member (hidden 128: ComfyUI 0.33.0): a merged LoRA has the effect
    of its parts in the pack and in core, a resize writes the rank asked for, a bake samples like
    the runtime LoRA, and extracting the baked file against its base gives that LoRA back."""
    if comfyui_version(comfy_server) < (0, 33, 0):
        pytest.skip("ComfyUI 0.3.75 cannot build the hidden-128 FLUX.2 tiny model (refusal: test_flux_family_server)")
    merged, baked, resized, extracted = (p.name for p in flux2_written)
    base = {**common(FLUX2), "latent": {"class_type": "EmptyFlux2LatentImage",
                                        "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    base["guid"]["inputs"]["guidance"] = 4.0
    merge = {"merge": {"class_type": "FluxQMergeLoRAs", "inputs": {
        "model": ["gguf", 0], "lora_1": FLUX2_LORA, "weight_1": 0.7, "lora_2": FLUX2_LORA, "weight_2": -0.4,
        "lora_3": "none", "weight_3": 1.0, "lora_4": "none", "weight_4": 1.0, "mode": "exact (concatenate ranks)",
        "rank": 32, "save_name": merged, "save_dtype": "float32", "overwrite": False}},
        "resize": {"class_type": "FluxQResizeLoRA", "inputs": {
            "model": ["gguf", 0], "lora_name": FLUX2_LORA, "mode": "fixed rank", "rank": 2, "kept_fraction": 0.9,
            "save_name": resized, "save_dtype": "bfloat16", "overwrite": False}}}
    history = comfy_server.run({**base, **merge})
    assert "mean 0," in history["outputs"]["merge"]["text"][0]  # exact: no error in any layer
    assert "rank 2" in history["outputs"]["resize"]["text"][0]
    lora = apply("lora", ["gguf", 0], FLUX2_LORA, 0.3)  # 0.7 - 0.4: what the merge sums to
    prompt = {
        **base, **lora, **apply("merged", ["gguf", 0], merged, 1.0),
        "core": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["gguf", 0], "lora_name": merged,
                                                                 "strength_model": 1.0}},
        "bake": {"class_type": "FluxQSaveGGUF", "inputs": {
            "model": ["lora", 0], "gguf_type": "Q8_0", "save_name": baked, "overwrite": False}},
        **one_step(["gguf", 0], "base"), **one_step(["lora", 0], "runtime"), **one_step(["merged", 0], "merged"),
        **one_step(["core", 0], "core"), **one_step(["bake", 0], "baked"),
    }
    history = comfy_server.run(prompt)
    latent = {n: saved_latent(comfy_server, history, f"{n}_save") for n in ("base", "runtime", "merged", "core", "baked")}
    effect = torch.linalg.norm(latent["runtime"] - latent["base"])
    assert effect > 1e-3
    torch.testing.assert_close(latent["merged"], latent["runtime"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latent["core"], latent["runtime"], rtol=2e-4, atol=2e-4)
    assert torch.linalg.norm(latent["baked"] - latent["runtime"]) < 0.05 * effect
    assert "0 keys unmatched" in history["outputs"]["merged"]["text"][0]

    # extracting baked minus base gives the LoRA back, up to the re-quantization (Q8_0 both)
    extract = {"extract": {"class_type": "FluxQExtractLoRA", "inputs": {
        "base_model": FLUX2, "tuned_model": baked, "rank": 8, "kept_fraction": 1.0, "save_name": extracted,
        "save_dtype": "float32", "overwrite": False}}}
    comfy_server.run({**base, **extract})
    history = comfy_server.run({**base, **apply("extracted", ["gguf", 0], extracted, 1.0),
                                **one_step(["extracted", 0], "extracted")})
    from_extract = saved_latent(comfy_server, history, "extracted_save")
    assert torch.linalg.norm(from_extract - latent["runtime"]) < 0.1 * effect
