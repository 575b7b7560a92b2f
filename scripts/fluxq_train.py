"""Train a FLUX LoRA outside the graph: the FluxQTrainLoRA node's own code path, with ComfyUI
loaded as a library, on one process or data-parallel under torchrun.

    python scripts/fluxq_train.py train.yaml
    python scripts/fluxq_train.py train.json --set steps=2000 --set resume=my_lora_step001000.safetensors
    torchrun --nproc_per_node 4 scripts/fluxq_train.py train.yaml          # 4 GPUs, NCCL
    torchrun --nproc_per_node 2 scripts/fluxq_train.py train.yaml --cpu    # gloo on the CPU

The settings file (JSON or YAML) holds the node's inputs by name; absent ones take the node's
defaults. `model`, `clip` and `vae` name files in ComfyUI's model folders, as the loader nodes
would: `model` a FLUX transformer in models/diffusion_models (.gguf through this pack, else core),
`clip` the text encoder file(s) in models/text_encoders (FLUX.1: CLIP-L or [CLIP-L, T5-XXL]; Chroma:
T5-XXL; FLUX.2 [dev]: Mistral; klein: Qwen3 — read as the detected model's family, or as
`clip_type` (flux1, chroma, flux2, klein) when given), `vae` in models/vae. The LoRA, its
step checkpoints and .trainstate go to models/loras exactly as the node writes them, so either
can resume the other's run. `batch_size` is per rank: N ranks x batch b train like one process
with batch N*b (same LoRA within float rounding), so a run can resume on a different number of
ranks with batch_size scaled to keep the global batch.

ComfyUI is COMFYUI_PATH, else --comfyui, else the harness's .harness/ComfyUI.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui_flux_qlora"
MODEL_INPUTS = ("model", "vae", "clip")
SCRIPT_SETTINGS = ("clip_type",)  # the script's own: how to read `clip` (default: the model's family)
# come from other nodes' outputs: the file uses `dataset`, and the samples take the node's default sampler settings
LIST_INPUTS = ("images", "captions", "dataset_name", "sample_settings")
DECIMAL = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


class SettingsError(ValueError):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", help="JSON or YAML file of FluxQTrainLoRA inputs")
    parser.add_argument("--set", action="append", default=[], metavar="INPUT=VALUE",
                        help="override one input (VALUE parsed as JSON, else taken as text); repeatable")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or str(PACK_DIR / ".harness" / "ComfyUI"),
                        help="ComfyUI folder (default: $COMFYUI_PATH, else the harness)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (gloo between ranks)")
    parser.add_argument("--extra-model-paths-config", action="append", default=[], metavar="FILE",
                        help="ComfyUI extra_model_paths.yaml for the model folders")
    parser.add_argument("--input-directory", help="ComfyUI input folder the `dataset` is in")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds any rank waits for the others before the run fails (default 600)")
    return parser.parse_args(argv)


def read_settings(path: str, overrides: list[str]) -> dict:
    """The file's mapping with `--set` applied. YAML through safe_load: a settings file never runs code."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            settings = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SettingsError(f"{path}: not valid YAML: {e}") from None
    else:
        try:
            settings = json.loads(text)
        except ValueError as e:
            raise SettingsError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path}: expected a mapping of FluxQTrainLoRA input names to values")
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise SettingsError(f"--set {item!r}: expected INPUT=VALUE")
        try:
            settings[name.strip()] = json.loads(value)
        except ValueError:
            settings[name.strip()] = value
    return settings


def bootstrap_comfyui(comfy_dir: str, cpu: bool) -> None:
    """ComfyUI as a library: its root on sys.path and its command line parsed before `comfy` is
    imported (otherwise it probes for CUDA). Under torchrun each rank sees one GPU, its LOCAL_RANK,
    as ComfyUI's own --cuda-device would arrange."""
    if not (Path(comfy_dir) / "main.py").is_file():
        raise SettingsError(f"no ComfyUI at {comfy_dir}: set COMFYUI_PATH or --comfyui")
    if not cpu and "LOCAL_RANK" in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["LOCAL_RANK"]
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    argv, sys.argv = sys.argv, [sys.argv[0], *(["--cpu"] if cpu else [])]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the arguments above)
    finally:
        sys.argv = argv


def import_pack():
    """The pack as ComfyUI imports it (a package named by its folder), so its relative imports work."""
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_NAME, PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK_NAME}.nodes.train"), importlib.import_module(f"{PACK_NAME}.nodes.training")


def node_settings(node_class, given: dict) -> dict:
    """`given` checked against the node's schema (names, types, ranges, choices), with the node's
    defaults for what is absent: what ComfyUI's validation would hand the node."""
    inputs = {i.id: i for i in node_class.define_schema().inputs}
    unknown = sorted(set(given) - set(inputs) - set(LIST_INPUTS) - set(SCRIPT_SETTINGS))
    if unknown:
        raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; FluxQTrainLoRA's inputs are "
                            f"{', '.join(k for k in inputs if k not in LIST_INPUTS)}")
    given_lists = sorted(set(given) & set(LIST_INPUTS))
    if given_lists:
        raise SettingsError(f"{', '.join(given_lists)} come from other nodes; give a `dataset` folder instead "
                            "(samples use the node's default sampler settings)")
    settings = {}
    for name, spec in inputs.items():
        if name in LIST_INPUTS or name in MODEL_INPUTS:
            continue
        value = given.get(name, spec.default)
        kind = spec.get_io_type()
        if value is None:
            raise SettingsError(f"setting {name!r} is required")
        if kind == "INT":
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingsError(f"setting {name!r} must be an integer, not {value!r}")
        elif kind == "FLOAT":
            if isinstance(value, str) and DECIMAL.fullmatch(value.strip()):
                value = float(value)  # PyYAML follows YAML 1.1: `1e-4` (no decimal point) reads as text
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SettingsError(f"setting {name!r} must be a number, not {value!r}")
            value = float(value)
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            raise SettingsError(f"setting {name!r} must be true or false, not {value!r}")
        elif kind == "STRING" and not isinstance(value, str):
            raise SettingsError(f"setting {name!r} must be text, not {value!r}")
        elif kind == "COMBO" and value not in spec.options:
            shown = ", ".join(map(str, spec.options[:12])) + (" ..." if len(spec.options) > 12 else "")
            raise SettingsError(f"setting {name!r}: {value!r} is not one of {shown}")
        low, high = getattr(spec, "min", None), getattr(spec, "max", None)
        if kind in ("INT", "FLOAT") and ((low is not None and value < low) or (high is not None and value > high)):
            raise SettingsError(f"setting {name!r}: {value} is outside {low}..{high}")
        settings[name] = value
    return settings


def load_models(given: dict):
    """MODEL, VAE, CLIP from the file names in the settings, through the pack's and core's loaders."""
    import folder_paths

    glue = importlib.import_module(f"{PACK_NAME}.nodes.comfy_glue")
    missing = [name for name in MODEL_INPUTS if not given.get(name)]
    if missing:
        raise SettingsError(f"setting(s) {', '.join(missing)} must name model files "
                            "(model: models/diffusion_models, vae: models/vae, clip: models/text_encoders)")

    def path(folder: str, name) -> str:
        if not isinstance(name, str):
            raise SettingsError(f"a {folder} file name must be text, not {name!r}")
        full = folder_paths.get_full_path(folder, name)
        if full is None:
            raise SettingsError(f"{name!r} is not a file in ComfyUI's {folder!r} model folders")
        return full

    model = glue.load_diffusion_model(path("diffusion_models", given["model"]))
    # the text encoders the model's family member uses, as FluxQLoadTextEncodersGGUF's `type`
    encoder = given.get("clip_type") or glue.model_family(model).member.text_encoder
    if encoder not in glue.TEXT_ENCODER_TYPES:
        raise SettingsError(f"setting 'clip_type': {encoder!r} is not one of {', '.join(glue.TEXT_ENCODER_TYPES)}")
    clip_names = given["clip"] if isinstance(given["clip"], list) else [given["clip"]]
    if not 1 <= len(clip_names) <= (2 if encoder == "flux1" else 1):
        raise SettingsError(f"setting 'clip' must name CLIP-L, or [CLIP-L, T5-XXL] (clip_type flux1), or the one "
                            f"encoder file of clip_type {encoder}; got {clip_names!r}")
    clip_paths = [path("text_encoders", name) for name in clip_names]
    clip = glue.load_text_encoders(clip_paths[0], clip_paths[1] if len(clip_paths) > 1 else None, encoder)
    vae = glue.load_vae(path("vae", given["vae"]))
    return model, vae, clip


def configure_folders(args) -> None:
    import folder_paths

    if args.extra_model_paths_config:
        from utils.extra_config import load_extra_path_config  # ComfyUI's own reader

        for config in args.extra_model_paths_config:
            load_extra_path_config(config)
    if args.input_directory:
        folder_paths.set_input_directory(os.path.abspath(args.input_directory))


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM do what ComfyUI's cancel does: the step in progress finishes,
    every rank stops after it, rank 0 saves it. The trainer asks `requested()` between steps, so
    under torchrun all ranks stop at the same step (a rank that stopped mid-step would leave the
    others waiting in a collective). Before the loop first asks, nothing is trained yet: a signal
    then ends the process at once. A second signal changes nothing (a terminal's Ctrl-C reaches
    torchrun's workers twice: from the terminal and forwarded by torchrun)."""

    def __init__(self):
        self.training = False
        self.signal: signal.Signals | None = None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if not self.training:
            # os.write: print() may be in the middle of a write on this thread
            os.write(2, f"fluxq_train: {name} before training started: stopped, nothing was saved\n".encode())
            raise SystemExit(128 + signum)
        if self.signal is None:
            self.signal = signal.Signals(signum)
            logging.info("fluxq_train: %s: stopping after the current step", name)

    def requested(self) -> bool:
        self.training = True
        return self.signal is not None


def run(args, models=None) -> str:
    """The whole script after argument parsing; `models` (model, vae, clip) skips loading them
    from files (a test's model that no file describes). Returns the saved LoRA file name."""
    given = read_settings(args.settings, args.set)
    bootstrap_comfyui(os.path.abspath(args.comfyui), args.cpu)
    configure_folders(args)
    train_node, training = import_pack()
    settings = node_settings(train_node.FluxQTrainLoRA, given)

    import torch.distributed as dist

    from comfyui_flux_qlora.lora_ops.distributed import world_from_env

    glue = importlib.import_module(f"{PACK_NAME}.nodes.comfy_glue")
    world = world_from_env(glue.training_device(), args.timeout)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {world.rank}] %(message)s", force=True)
    logging.info("fluxq_train: rank %d of %d, pid %d", world.rank, world.size, os.getpid())
    stop = StopOnSignal()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop.handle)
    try:
        model, vae, clip = models if models is not None else load_models(given)
        import torch

        with torch.inference_mode():  # as ComfyUI's executor runs the node
            _, lora_file, losses, _ = training.train_lora(model, vae, clip, settings, world=world,
                                                          stop_requested=stop.requested)
        world.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if world.is_main:
        logging.info("fluxq_train: saved %s after %d steps (last loss %.4f)", lora_file, len(losses), losses[-1])
    logging.info("fluxq_train: peak memory of this rank: %s", peak_memory())
    return lora_file


def peak_memory() -> str:
    import resource

    import torch

    text = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB resident"  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated on the GPU"
    return text


def main(argv=None, models=None) -> int:
    args = parse_args(argv)
    try:
        run(args, models)
    except (SettingsError, ValueError, FileNotFoundError) as e:
        print(f"fluxq_train: error: {e}", file=sys.stderr)
        return 2
    except BaseException as e:  # ComfyUI 0.33's interrupt is a BaseException
        glue = sys.modules.get(f"{PACK_NAME}.nodes.comfy_glue")
        if glue is None or not isinstance(e, glue.TrainingCancelled):
            raise
        # the run's own words: the file it saved (rank 0) or that rank 0 writes it
        print(f"fluxq_train: {e}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
