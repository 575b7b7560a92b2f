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


def one_step(model_ref, prefix, seed=3, cond="guid"):
    """Core text encoding, KSampler (1 step: every step reads the tiny model's ~535M weights), SaveLatent."""
    return {
        f"{prefix}_ks": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": [cond, 0], "negative": [cond, 0], "latent_image": ["latent", 0],
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


def merge_and_resize(lora_a, lora_b, merged, resized):
    """FluxQMergeLoRAs of 0.7 x lora_a and -0.4 x lora_b (exact) into `merged`, and FluxQResizeLoRA
    of lora_a to rank 2 into `resized`, on the model node "gguf"."""
    return {"merge": {"class_type": "FluxQMergeLoRAs", "inputs": {
        "model": ["gguf", 0], "lora_1": lora_a, "weight_1": 0.7, "lora_2": lora_b, "weight_2": -0.4,
        "lora_3": "none", "weight_3": 1.0, "lora_4": "none", "weight_4": 1.0, "mode": "exact (concatenate ranks)",
        "rank": 32, "save_name": merged, "save_dtype": "float32", "overwrite": False}},
        "resize": {"class_type": "FluxQResizeLoRA", "inputs": {
            "model": ["gguf", 0], "lora_name": lora_a, "mode": "fixed rank", "rank": 2, "kept_fraction": 0.9,
            "save_name": resized, "save_dtype": "bfloat16", "overwrite": False}}}


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
    merge = merge_and_resize(TINY["lora"], TINY["lora_b"], MERGED, RESIZED)
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
    merge = merge_and_resize(FLUX2_LORA, FLUX2_LORA, merged, resized)
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




CHROMA = "fluxq-tiny-chroma-Q8_0.gguf"
CHROMA_LORA = "fluxq-test-chroma-lora.safetensors"
# An ai-toolkit Chroma LoRA (`diffusion_model.` + BFL names, which core reads too) on the input layer, the
# approximator and the final layer. The tiny Chroma is 3072 wide (its approximator's size is fixed), and
# extracting a 3072 x 3072 block layer costs a dense SVD of 6-50 s on the 2 shared cores: the layers
# here have 64 columns or rows (block layers go through the same code on FLUX.1 and FLUX.2 above).
CHROMA_LORA_LAYERS = {"img_in": (3072, 64), "distilled_guidance_layer.in_proj": (5120, 64),
                      "final_layer.linear": (64, 3072)}


def chroma_lora():
    """{module path: (down, up)} of the test's Chroma LoRA (rank 4, no alpha: scale 1)."""
    g = torch.Generator().manual_seed(8)
    return {path: (torch.randn(4, columns, generator=g) / columns ** 0.5, 0.1 * torch.randn(rows, 4, generator=g))
            for path, (rows, columns) in CHROMA_LORA_LAYERS.items()}


@pytest.fixture()
def chroma_written(models_dir, scratch_models):
    from safetensors.torch import save_file

    source = scratch_models / "loras" / CHROMA_LORA
    save_file({f"diffusion_model.{path}.lora_{side}.weight": t for path, (down, up) in chroma_lora().items()
               for side, t in (("A", down), ("B", up))}, str(source))
    yield from removed_afterwards([models_dir / "loras" / "fluxq-test-chroma-merged.safetensors",
                                   models_dir / "diffusion_models" / "fluxq-test-chroma-baked-Q8_0.gguf",
                                   models_dir / "loras" / "fluxq-test-chroma-resized.safetensors",
                                   models_dir / "loras" / "fluxq-test-chroma-extracted.safetensors"])
    source.unlink()


def test_merge_resize_bake_and_extract_on_chroma(comfy_server, chroma_written):
    """The workbench on Chroma (both ComfyUIs build its 3072-wide tiny model): an exact merge holds
    the weighted sum and has the runtime LoRA's effect in core and, baked, in the pack; a resize writes
    the rank asked for; the bake keeps the approximator at F16 and samples like the runtime LoRA; and
    extracting the baked file against its base finds exactly the LoRA's layers with their updates. Chroma reads no guidance: the text
    conditioning goes in as it is."""
    import gguf
    from safetensors.torch import load_file

    merged, baked, resized, extracted = (p.name for p in chroma_written)
    base = common(CHROMA)
    del base["guid"]
    merge = merge_and_resize(CHROMA_LORA, CHROMA_LORA, merged, resized)
    history = comfy_server.run({**base, **merge})
    assert history["outputs"]["merge"]["text"][0].startswith(f"{merged}: 3 layers, rank 8, relative error mean 0,")
    assert "3 layers, rank 2, relative error mean 0." in history["outputs"]["resize"]["text"][0]

    # the merged file holds the LoRA at 0.7 - 0.4 exactly, and the pack reads every key of it
    written = load_file(str(chroma_written[0]))
    for path, (down, up) in chroma_lora().items():
        name = "lora_unet_" + path.replace(".", "_")
        assert float(written[f"{name}.alpha"]) == 8.0  # alpha = rank: scale 1
        torch.testing.assert_close(written[f"{name}.lora_up.weight"] @ written[f"{name}.lora_down.weight"],
                                   0.3 * up @ down, rtol=1e-5, atol=1e-6)

    def step(model_ref, prefix):
        return one_step(model_ref, prefix, cond="text")

    lora = apply("lora", ["gguf", 0], CHROMA_LORA, 0.3)  # 0.7 - 0.4: what the merge sums to
    prompt = {  # four samples: a Chroma step reads ~0.6 B weights (~7 s on 2 cores)
        **base, **lora, **apply("merged", ["gguf", 0], merged, 1.0),
        "core": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["gguf", 0], "lora_name": merged,
                                                                 "strength_model": 1.0}},
        # the merged file applied by the pack, baked: its sample shows the pack's reading and the bake
        "bake": {"class_type": "FluxQSaveGGUF", "inputs": {
            "model": ["merged", 0], "gguf_type": "Q8_0", "save_name": baked, "overwrite": False}},
        **step(["gguf", 0], "base"), **step(["lora", 0], "runtime"), **step(["core", 0], "core"),
        **step(["bake", 0], "baked"),
    }
    history = comfy_server.run(prompt)
    assert "3 modules matched, 0 keys unmatched" in history["outputs"]["merged"]["text"][0]
    latent = {n: saved_latent(comfy_server, history, f"{n}_save") for n in ("base", "runtime", "core", "baked")}
    effect = torch.linalg.norm(latent["runtime"] - latent["base"])
    assert effect > 1e-2
    # core merges the update into these F16 layers, rounding each sum to F16; the pack adds it in
    # float32 beside them: equal up to that rounding (measured 0.003 of the effect)
    assert torch.linalg.norm(latent["core"] - latent["runtime"]) < 0.01 * effect
    # the bake writes these layers (W + update) as F16: the same rounding as core's
    assert torch.linalg.norm(latent["baked"] - latent["runtime"]) < 0.01 * effect
    # the type policy: approximator and entry/exit layers F16, block matrices Q8_0, 1-D F32
    tensors = gguf.GGUFReader(chroma_written[1]).tensors
    types = {t.name: t.tensor_type.name for t in tensors}
    approximator = {t.tensor_type.name for t in tensors if t.name.startswith("distilled_guidance_layer.")
                    and len(t.shape) == 2}
    assert approximator == {"F16"}, approximator
    assert types["double_blocks.0.img_attn.proj.weight"] == "Q8_0" and types["img_in.weight"] == "F16"
    assert types["distilled_guidance_layer.in_proj.bias"] == "F32"

    # baked minus base: exactly the LoRA's three layers differ (the Q8_0 blocks re-quantize to the same
    # bytes, F16 and F32 tensors are kept), each by the LoRA at 0.3 up to F16 rounding
    extract = {"extract": {"class_type": "FluxQExtractLoRA", "inputs": {
        "base_model": CHROMA, "tuned_model": baked, "rank": 4, "kept_fraction": 1.0, "save_name": extracted,
        "save_dtype": "float32", "overwrite": False}}}
    history = comfy_server.run({**base, **extract})
    assert history["outputs"]["extract"]["text"][0].startswith(f"{extracted}: 3 layers, rank 4")
    written = load_file(str(chroma_written[3]))
    for path, (down, up) in chroma_lora().items():
        name = "lora_unet_" + path.replace(".", "_")
        found = written[f"{name}.lora_up.weight"] @ written[f"{name}.lora_down.weight"]
        assert float(written[f"{name}.alpha"]) == 4.0  # alpha = rank: scale 1
        error = torch.linalg.norm(found - 0.3 * up @ down) / torch.linalg.norm(0.3 * up @ down)
        assert error < 0.01, (path, float(error))  # measured 9e-4

    # a FLUX.1 [dev] file against the Chroma: refused from the layer names alone, nothing written
    wrong = {"extract": {**extract["extract"], "inputs": {**extract["extract"]["inputs"], "tuned_model": Q8,
                                                          "save_name": "never-written"}}}
    with pytest.raises(ExecutionFailed, match=r"not of one family: \d+ layer\(s\) are in only one of them, e\.g\. '"):
        comfy_server.run({**base, **wrong})
    assert not (chroma_written[3].parent / "never-written.safetensors").exists()
