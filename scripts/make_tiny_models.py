"""Writes the embedded default models: tiny FLUX-architecture models with random weights.

No weights can be downloaded, so the demo and the tests run on models built here, in the real
file formats, from ComfyUI's own classes (so ComfyUI's detectors recognise them):

- a FLUX.1-dev-shaped transformer (hidden 3072 — ComfyUI's detector fixes 24 heads x 128 —
  but 1 double + 1 single block, context/vec dims 768 so CLIP-L alone conditions it), as F32
  .safetensors (the reference for core's UNETLoader) and as .gguf in several quant types;
- the same for schnell (no ``guidance_in``);
- a random CLIP-L and a random FLUX VAE (16 latent channels);
- two small random kohya-format LoRAs;
- the other FLUX family members as Q8_0 .gguf (configs from ``lora_ops.flux_family``): Fill
  (``img_in`` 384 wide), FLUX.2 [dev] (with ``guidance_in``) and [klein] (without) at width 128
  (ComfyUI 0.33.0's detection derives FLUX.2's heads from the width; 0.3.75 cannot load them), and
  a FLUX.2 VAE (32 z-channels, batch-norm latent: 128 channels at /16), and Chroma (3072 wide, its
  fixed-size approximator included: ~0.62 B parameters), and a kohya-format LoRA for the tiny
  FLUX.2 [dev] (a FLUX.1 LoRA is refused on FLUX.2: the bundled FLUX.2 workflow needs its own).

Random weights draw noise: these files prove the plumbing and the numerics, not image quality.
Generation is deterministic (fixed seeds) and skipped for files that already exist.

    python scripts/make_tiny_models.py --comfyui PATH_TO_COMFYUI [--force]
"""

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PACK_DIR = Path(__file__).resolve().parent.parent

GGUF_TYPES_DEV = ("F16", "Q8_0", "Q4_K")
LORA_RANK = 4


def import_comfy(comfy_dir: Path):
    """Import ComfyUI as a library: CPU mode, so it never probes for a GPU."""
    sys.path.insert(0, str(comfy_dir))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.ops

    return comfy


def flux_params(**params) -> dict:
    """``params`` for ComfyUI's ``Flux`` model class, plus what this ComfyUI requires: 0.33+'s
    ``FluxParams`` grew ``txt_ids_dims`` (FLUX.2's text position ids), [] for FLUX.1 as its own
    detection sets it."""
    import comfy.ldm.flux.model

    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        params.setdefault("txt_ids_dims", [])
    return params


def model_params(params_class, params: dict) -> dict:
    """``params`` for a ComfyUI model class (its ``FluxParams`` / ``ChromaParams`` dataclass),
    fitted to this ComfyUI: 0.33+ grew ``txt_ids_dims`` (FLUX.2's text position ids; [] for FLUX.1,
    as its own detection sets it) and Chroma's ``vec_in_dim``; 0.3.75 has neither. Neither makes a
    tensor, so both ComfyUIs write the same files."""
    fields = {f.name for f in dataclasses.fields(params_class)}
    params = {"txt_ids_dims": [], "vec_in_dim": None, **params}
    return {k: v for k, v in params.items() if k in fields}


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Every tensor set explicitly: ComfyUI builds modules uninitialised (torch.empty garbage)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, tensor in module.state_dict().items():
        shape = tuple(tensor.shape)
        if tensor.ndim >= 2:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        elif "norm" in name and name.endswith(("weight", "scale")):
            value = np.ones(shape, np.float32)
        else:
            value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        out[name] = value.astype(np.float32)
    return out


def tiny_member(comfy, member_id: str, seed: int) -> dict[str, np.ndarray]:
    """The family member's tiny config (``flux_family``) built in ComfyUI's own model class."""
    import importlib

    from lora_ops.flux_family import BY_ID

    member = BY_ID[member_id]
    module_name, class_name = member.comfy_model.rsplit(".", 1)
    module = importlib.import_module(module_name)
    params = model_params(getattr(module, class_name + "Params"), dict(member.tiny))
    with torch.device("meta"):
        model = getattr(module, class_name)(operations=comfy.ops.disable_weight_init, **params)
    return random_state_dict(model, seed)


def tiny_clip_l(comfy, seed: int) -> dict[str, np.ndarray]:
    import json

    import comfy.clip_model

    config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    sd = random_state_dict(model, seed)
    # position ids are integer indices, not weights
    sd.pop("text_model.embeddings.position_ids", None)
    return sd


def tiny_flux_vae(comfy, seed: int) -> dict[str, np.ndarray]:
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig},
        )
    return random_state_dict(model, seed)


def tiny_flux2_vae(comfy, seed: int) -> dict[str, np.ndarray]:
    """FLUX.2's VAE layout (what ComfyUI's VAE loader recognises: 32 z-channels, quant convs,
    ``bn.*`` batch-norm statistics of the 2x2-patchified latent -> 128 channels at /16). The
    encoder width stays 128 and there are 2 res blocks per level: ComfyUI's loader assumes both
    (with fewer, the blocks it builds stay uninitialised and encoding is not finite)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0, "batch_norm_latent": True}
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig=ddconfig, embed_dim=32)
    sd = random_state_dict(model, seed)
    # running statistics, not weights: a variance must be positive
    sd["bn.running_mean"] = np.zeros_like(sd["bn.running_mean"])
    sd["bn.running_var"] = np.ones_like(sd["bn.running_var"])
    sd["bn.num_batches_tracked"] = np.array(0, np.int64)
    return sd


def tiny_kohya_lora(flux_sd: dict[str, np.ndarray], seed: int, scale: float) -> dict[str, np.ndarray]:
    """Rank-4 kohya LoRA on every 2-D block weight, random up and down (a trained one is not zero)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, weight in flux_sd.items():
        if weight.ndim != 2 or not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        prefix = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        rows, cols = weight.shape
        out[prefix + ".lora_down.weight"] = rng.standard_normal((LORA_RANK, cols), dtype=np.float32) / np.sqrt(cols)
        out[prefix + ".lora_up.weight"] = scale * rng.standard_normal((rows, LORA_RANK), dtype=np.float32) / np.sqrt(LORA_RANK)
        out[prefix + ".alpha"] = np.array(float(LORA_RANK), np.float32)
    return out


def save_safetensors(path: Path, sd: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    from lora_ops.lora_checkpoint import atomic_save_safetensors

    atomic_save_safetensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, metadata or {}, str(path))


@dataclass(frozen=True)
class TinyModelFiles:
    """Where each embedded model goes inside ComfyUI's models/ folder."""

    models: Path

    @property
    def dev(self) -> list[Path]:
        """The F32 reference .safetensors, then the .gguf files (GGUF_TYPES_DEV)."""
        folder = self.models / "diffusion_models"
        return [folder / "fluxq-tiny-dev.safetensors"] + [folder / f"fluxq-tiny-dev-{t}.gguf" for t in GGUF_TYPES_DEV]

    @property
    def loras(self) -> list[Path]:
        return [self.models / "loras" / "fluxq-tiny-lora.safetensors", self.models / "loras" / "fluxq-tiny-lora-b.safetensors"]

    @property
    def schnell(self) -> Path:
        return self.models / "diffusion_models" / "fluxq-tiny-schnell-Q8_0.gguf"

    @property
    def clip_l(self) -> Path:
        return self.models / "text_encoders" / "fluxq-tiny-clip_l.safetensors"

    @property
    def vae(self) -> Path:
        return self.models / "vae" / "fluxq-tiny-ae.safetensors"

    def member(self, member_id: str) -> Path:
        """A family member's tiny Q8_0 .gguf (flux1-fill-dev, flux2-dev, flux2-klein-4b, ...)."""
        return self.models / "diffusion_models" / f"fluxq-tiny-{member_id}-Q8_0.gguf"

    @property
    def flux2_vae(self) -> Path:
        return self.models / "vae" / "fluxq-tiny-flux2-ae.safetensors"

    @property
    def flux2_lora(self) -> Path:
        return self.models / "loras" / "fluxq-tiny-flux2-lora.safetensors"

    def all(self) -> list[Path]:
        return [*self.dev, *self.loras, self.schnell, self.clip_l, self.vae,
                *(self.member(m) for m in EXTRA_MEMBERS), self.flux2_vae, self.flux2_lora]


# Family members beyond dev/schnell, each one tiny Q8_0 .gguf (Kontext and Krea are dev's tensors).
# Both ComfyUIs get the same files; ComfyUI 0.3.75 cannot build tiny FLUX.2 (its detection fixes
# 48 heads), and the loader refuses them there, naming 0.33.0.
# Chroma's approximator is fixed-size, so its tiny model has ~0.62 B parameters (~0.9 GB as this
# Q8_0 file, ~1 min to write on 2 cores): written once, like the tiny FLUX.1 models.
EXTRA_MEMBERS = ("flux1-fill-dev", "flux2-dev", "flux2-klein-4b", "chroma")


def write_models(comfy_dir: Path, files: TinyModelFiles, missing: list[Path]) -> None:
    comfy = import_comfy(comfy_dir)
    from gguf import GGMLQuantizationType

    from lora_ops.gguf_write import flux_qtype_for, write_gguf

    for path in missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[tiny-models] writing {path}", flush=True)

    if any(p in missing for p in files.dev + files.loras):
        dev = tiny_member(comfy, "flux1-dev", seed=1)
        if files.dev[0] in missing:
            save_safetensors(files.dev[0], dev)
        for qtype_name, path in zip(GGUF_TYPES_DEV, files.dev[1:]):
            if path in missing:
                write_gguf(path, dev, flux_qtype_for(GGMLQuantizationType[qtype_name]), rng=np.random.default_rng(7))
        for seed, path in enumerate(files.loras):
            if path in missing:
                save_safetensors(path, tiny_kohya_lora(dev, seed=10 + seed, scale=0.5), {"ss_network_dim": str(LORA_RANK)})
        del dev
    if files.schnell in missing:
        write_gguf(files.schnell, tiny_member(comfy, "flux1-schnell", seed=2), flux_qtype_for(GGMLQuantizationType.Q8_0))
    if files.clip_l in missing:
        save_safetensors(files.clip_l, tiny_clip_l(comfy, seed=3))
    if files.vae in missing:
        save_safetensors(files.vae, tiny_flux_vae(comfy, seed=4))
    for seed, member_id in enumerate(EXTRA_MEMBERS, start=20):
        if files.member(member_id) in missing:
            write_gguf(files.member(member_id), tiny_member(comfy, member_id, seed),
                       flux_qtype_for(GGMLQuantizationType.Q8_0))
    if files.flux2_vae in missing:
        save_safetensors(files.flux2_vae, tiny_flux2_vae(comfy, seed=5))
    if files.flux2_lora in missing:  # only the shapes of the tiny FLUX.2 [dev] matter here
        flux2 = tiny_member(comfy, "flux2-dev", seed=21)
        save_safetensors(files.flux2_lora, tiny_kohya_lora(flux2, seed=12, scale=0.5), {"ss_network_dim": str(LORA_RANK)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", required=True, type=Path, help="ComfyUI root whose models/ folders receive the files")
    parser.add_argument("--force", action="store_true", help="rewrite files that already exist")
    args = parser.parse_args()

    sys.path.insert(0, str(PACK_DIR))
    files = TinyModelFiles(args.comfyui / "models")
    missing = [p for p in files.all() if args.force or not p.exists()]
    if missing:  # ComfyUI is imported only when something must be written: a warm setup takes seconds
        write_models(args.comfyui, files, missing)
    print(f"[tiny-models] ready in {files.models}")


if __name__ == "__main__":
    main()
