"""scripts/fluxq_train.py on the narrow FLUX of test_trainer.py (no file format describes a
hidden-128 FLUX, so the model is built here and handed to the script's `main`; CLIP and VAE are
the harness's tiny files, loaded as test_trainer's fixture loads them). Run by the tests under
torchrun or plain python, with the script's own command line."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE.parent.parent / "scripts", HERE.parent, HERE):
    sys.path.insert(0, str(path))

import fluxq_train  # noqa: E402


def main() -> int:
    args = fluxq_train.parse_args()
    fluxq_train.bootstrap_comfyui(args.comfyui, args.cpu)
    import torch

    import comfy.sd
    import comfy.utils
    import folder_paths
    from test_trainer import TINY_CLIP_L, TINY_VAE, narrow_flux

    with torch.inference_mode():
        clip = comfy.sd.load_clip([folder_paths.get_full_path_or_raise("text_encoders", TINY_CLIP_L)],
                                  clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("vae", TINY_VAE)))
    return fluxq_train.main(models=(narrow_flux(), vae, clip))


if __name__ == "__main__":
    sys.exit(main())
