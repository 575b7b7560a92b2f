"""Write a FLUX transformer as a GGUF of a chosen type from a shell: the FluxQSaveGGUF node's own
code path, with ComfyUI loaded as a library.

    python scripts/fluxq_quantize.py flux1-dev.safetensors flux1-dev-Q4_K.gguf --type Q4_K
    python scripts/fluxq_quantize.py flux1-dev-Q8_0.gguf baked-Q8_0.gguf --type Q8_0 \\
        --lora my_style.safetensors:0.8 --lora detail.safetensors:0.5

MODEL is a GGUF (read through this pack) or a float checkpoint (through core ComfyUI's loader);
each --lora FILE:STRENGTH is applied as FluxQApplyLoRA applies it (any format it reads) and baked
in. Tensor types follow the published FLUX GGUFs (1-D and small tensors F32, input/output layers
and Chroma's approximator F16, the rest TYPE); K-quants need the PyPI package libggml-python. The
output is written under a temporary name and renamed when complete; an existing OUTPUT is kept
unless --overwrite.

ComfyUI is COMFYUI_PATH, else --comfyui, else the harness's .harness/ComfyUI.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import time

from fluxq_train import (
    PACK_DIR,
    PACK_NAME,
    SettingsError,
    bootstrap_comfyui,
    import_pack,
)

TYPES = ("F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="FLUX transformer: .gguf or float .safetensors")
    parser.add_argument("output", help="the .gguf to write")
    parser.add_argument("--type", required=True, help=f"main tensor type: {', '.join(TYPES)}")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE:STRENGTH",
                        help="a LoRA to bake in at STRENGTH (default 1); repeatable")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or str(PACK_DIR / ".harness" / "ComfyUI"),
                        help="ComfyUI folder (default: $COMFYUI_PATH, else the harness)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    return parser.parse_args(argv)


def lora_specs(specs: list[str]) -> list[tuple[str, float]]:
    out = []
    for spec in specs:
        path, sep, strength = spec.rpartition(":")
        if not sep or not path:  # no strength given (a Windows drive letter alone is not one)
            path, strength = spec, "1"
        try:
            value = float(strength)
        except ValueError:
            path, value = spec, 1.0
        if not os.path.isfile(path):
            raise SettingsError(f"--lora {spec!r}: no file {path!r}")
        out.append((os.path.abspath(path), value))
    return out


def run(args) -> str:
    if args.type not in TYPES:
        raise SettingsError(f"--type {args.type!r}: choose one of {', '.join(TYPES)}")
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not args.overwrite:
        raise SettingsError(f"{output} exists; pass --overwrite to replace it")
    if not os.path.isfile(args.model):
        raise SettingsError(f"no model file {args.model!r}")
    loras = lora_specs(args.lora)
    bootstrap_comfyui(os.path.abspath(args.comfyui), args.cpu)
    import_pack()
    import folder_paths
    import torch

    glue = importlib.import_module(f"{PACK_NAME}.nodes.comfy_glue")
    workbench = importlib.import_module(f"{PACK_NAME}.nodes.workbench")
    from comfyui_flux_qlora.lora_ops.ggml_quants import target_type

    model = glue.load_diffusion_model(os.path.abspath(args.model))
    for path, strength in loras:
        # the LoRA reader takes names in ComfyUI's loras folders, as the node's dropdown gives them
        folder_paths.add_model_folder_path("loras", os.path.dirname(path))
        entry, _, report = glue.load_lora_entry(model, os.path.basename(path), strength)
        print(report, file=sys.stderr)
        model = glue.with_lora_stack(model, glue.get_lora_stack(model).with_lora(entry))
    started = time.monotonic()

    def progress(done: int, total: int, name: str) -> None:
        print(f"\r[{done}/{total}] {100 * done // total:3d}% {name[:60]:<60}", end="", file=sys.stderr, flush=True)

    with torch.inference_mode():
        report = workbench.bake(model, output, target_type(args.type), args.overwrite, progress=progress)
    print(f"\n{report} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return output


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (SettingsError, FileExistsError, ValueError) as error:
        print(f"fluxq_quantize: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the pack's DiskFullError names the file and the free space
        if error.errno != errno.ENOSPC:
            raise
        print(f"fluxq_quantize: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
