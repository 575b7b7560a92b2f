"""The main job, headless: start ComfyUI with the pack, run a bundled workflow, save the PNGs.

    python scripts/demo.py [--workflow workflows/api/flux_dev_gguf_lora_txt2img.json] [--out out/demo]

When the ComfyUI in use (the harness's, or $COMFYUI_PATH) has the real FLUX files the workflow
names, they are used as they are. Otherwise the file names are mapped onto the embedded tiny
random-weight models (scripts/tiny_model_map.json) and the image is made small and quick:
those models draw noise — they prove the pipeline, not image quality.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from comfy_server import ComfyServer

PACK_DIR = Path(__file__).resolve().parent.parent
COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or PACK_DIR / ".harness" / "ComfyUI")
TINY_MAP = PACK_DIR / "scripts" / "tiny_model_map.json"
MODEL_FOLDERS = ("diffusion_models", "unet", "text_encoders", "clip", "vae", "loras")
# Small and quick on a CPU, for the tiny models only.
TINY_OVERRIDES = ["Sampler settings.preset=custom", "Sampler settings.steps=4",
                  "Sampler settings.width=256", "Sampler settings.height=256"]


def missing_models(workflow: dict, models: Path) -> list[str]:
    """Model file names the workflow asks for that no model folder holds."""
    present = {p.name for folder in MODEL_FOLDERS if (models / folder).is_dir() for p in (models / folder).rglob("*")}
    wanted = {value for node in workflow.values() for value in node["inputs"].values()
              if isinstance(value, str) and value.endswith((".gguf", ".safetensors", ".sft"))}
    return sorted(wanted - present)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workflow", type=Path, default=PACK_DIR / "workflows" / "api" / "flux_dev_gguf_lora_txt2img.json")
    parser.add_argument("--out", type=Path, default=PACK_DIR / "out" / "demo")
    args = parser.parse_args()

    workflow = json.loads(args.workflow.read_text())
    client = [sys.executable, str(PACK_DIR / "scripts" / "fluxq_client.py"), str(args.workflow), "--out", str(args.out)]
    missing = missing_models(workflow, COMFY_DIR / "models")
    if missing:
        print(f"[demo] real FLUX files not found ({', '.join(missing)}): using the embedded tiny random-weight "
              "models. They draw noise; put real files in ComfyUI's models/ folders for real images.")
        client += ["--map", str(TINY_MAP)] + [arg for override in TINY_OVERRIDES for arg in ("--set", override)]

    with tempfile.TemporaryDirectory(prefix="fluxq-demo-") as workdir:
        print(f"[demo] starting ComfyUI ({COMFY_DIR}) headless ...", flush=True)
        # the tiny models run on the CPU anywhere; real FLUX files get ComfyUI's own device choice
        server = ComfyServer(COMFY_DIR, Path(workdir), cpu=bool(missing))
        try:
            result = subprocess.run(client + ["--server", server.url])
            if result.returncode != 0:
                print(f"[demo] failed; the end of ComfyUI's log:\n{server.log_tail()}", file=sys.stderr)
                return result.returncode
        finally:
            server.stop()
    print(f"[demo] done: images in {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
