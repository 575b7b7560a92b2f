"""kohya-format LoRA checkpoints with a resumable training state beside them.

`<name>.safetensors` holds `lora_unet_<path>.lora_down.weight` / `.lora_up.weight` / `.alpha`
(what ComfyUI core, kohya and diffusers load) plus kohya's `ss_*` metadata. The sibling
`<name>.trainstate` is also safetensors (never pickle): optimizer tensors keyed by parameter name,
and the step, loss history and settings as JSON in its metadata. Its extension keeps it out of
ComfyUI's LoRA list. Every write goes to a temporary file in the same folder, then os.replace.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .errors import user_facing
from .flow_match import TrainState
from .lora_formats import kohya_name, module_path_from_kohya_name

LORA_EXTENSION = ".safetensors"
STATE_EXTENSION = ".trainstate"
_STATE_KEY = "fluxq_train_state"
_PAIR_KEY = "fluxq_checkpoint_id"  # in the LoRA's metadata and its train state: written together
_OPTIMIZER_PREFIX = "optimizer/"
_TENSORS_PREFIX = "tensors/"  # TrainState.tensors
_STEP_SUFFIX = re.compile(r"_step(\d{6,})$")
RUN_ID_KEY = "fluxq_run_id"


@user_facing
class CheckpointError(ValueError):
    pass


@dataclass
class LoraFactors:
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)


def lora_metadata(
    *, base_model: str, rank: int, alpha: float, steps: int, trigger_word: str,
    image_count: int, resolution: int, run_id: str, base_model_version: str = "flux1",
    network_module: str = "networks.lora_flux",
) -> dict[str, str]:
    """kohya's `ss_*` keys (read by kohya, A1111/Forge and model sites), the modelspec trigger, and
    the training run the file belongs to (pruning and name clashes go by run, not by file name).
    ``base_model`` / ``base_model_version`` / ``network_module``: the FLUX family member's
    (``flux_family.Member``)."""
    return {
        "ss_network_module": network_module,
        "ss_base_model_version": base_model_version,
        "ss_sd_model_name": base_model,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_steps": str(steps),
        "ss_num_train_images": str(image_count),
        "ss_resolution": f"({resolution}, {resolution})",
        "modelspec.trigger_phrase": trigger_word,
        "fluxq_format": "kohya",
        RUN_ID_KEY: run_id,
    }


def state_path_for(lora_path: str) -> str:
    return os.path.splitext(lora_path)[0] + STATE_EXTENSION


def step_checkpoint_name(name: str, step: int) -> str:
    return f"{name}_step{step:06d}{LORA_EXTENSION}"


def save_checkpoint(
    lora_path: str,
    factors: Mapping[str, LoraFactors],
    alpha: float,
    metadata: Mapping[str, str],
    state: TrainState | None = None,
    state_info: Mapping[str, object] | None = None,
) -> None:
    """Writes the LoRA and, with `state`, its `.trainstate` sibling (state first, so a LoRA file
    never points at an older state than its own)."""
    tensors, metadata = {}, dict(metadata)
    for path, f in factors.items():
        base = kohya_name(path)
        tensors[f"{base}.lora_down.weight"] = f.down.detach().float().cpu().contiguous()
        tensors[f"{base}.lora_up.weight"] = f.up.detach().float().cpu().contiguous()
        tensors[f"{base}.alpha"] = torch.tensor(float(alpha))
    if state is not None:
        state_tensors = {
            f"{_OPTIMIZER_PREFIX}{param}/{key}": value.detach().cpu().contiguous()
            for param, values in state.optimizer_state.items()
            for key, value in values.items()
        }
        state_tensors.update({f"{_TENSORS_PREFIX}{name}": value.detach().float().cpu().contiguous()
                              for name, value in state.tensors.items()})
        metadata[_PAIR_KEY] = uuid.uuid4().hex
        info = {**(state_info or {}), "step": state.step, "loss_history": state.loss_history,
                _PAIR_KEY: metadata[_PAIR_KEY]}
        atomic_save_safetensors(state_tensors, {_STATE_KEY: json.dumps(info)}, state_path_for(lora_path))
    atomic_save_safetensors(tensors, metadata, lora_path)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    """Write to a temporary file in the same folder, then rename: no half-written file survives."""
    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


def load_checkpoint(
    lora_path: str, module_paths: Iterable[str]
) -> tuple[dict[str, LoraFactors], float, dict[str, str]]:
    """Factors by module path, the (single) alpha, and the file's metadata."""
    module_paths = list(module_paths)
    label = os.path.basename(lora_path)
    factors: dict[str, LoraFactors] = {}
    alphas = set()
    with safe_open(lora_path, framework="pt") as f:
        metadata = f.metadata() or {}
        keys = set(f.keys())
        for key in sorted(keys):
            if not key.endswith(".lora_down.weight"):
                continue
            base = key[: -len(".lora_down.weight")]
            try:
                path = module_path_from_kohya_name(base, module_paths)
            except KeyError as e:
                raise CheckpointError(f"{label}: {e.args[0]} in this model") from None
            up_key, alpha_key = f"{base}.lora_up.weight", f"{base}.alpha"
            if up_key not in keys:
                raise CheckpointError(f"{label}: {key} has no {up_key}")
            factors[path] = LoraFactors(f.get_tensor(key).float(), f.get_tensor(up_key).float())
            alphas.add(float(f.get_tensor(alpha_key)) if alpha_key in keys else float(factors[path].down.shape[0]))
    if not factors:
        raise CheckpointError(f"{label} holds no kohya lora_unet_* factors")
    if len(alphas) != 1:
        raise CheckpointError(f"{label} mixes alphas {sorted(alphas)}; it was not written by this trainer")
    return factors, alphas.pop(), metadata


def load_train_state(lora_path: str) -> tuple[TrainState, dict]:
    """The state saved beside `lora_path`, and the settings recorded with it."""
    path = state_path_for(lora_path)
    label = os.path.basename(lora_path)
    if not os.path.isfile(path):
        raise CheckpointError(f"cannot resume from {label}: no {os.path.basename(path)} beside it")
    with safe_open(path, framework="pt") as f:
        info = json.loads((f.metadata() or {}).get(_STATE_KEY, "null"))
        if not isinstance(info, dict) or "step" not in info:
            raise CheckpointError(f"{os.path.basename(path)} is not a training state")
        optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
        tensors: dict[str, torch.Tensor] = {}
        for key in f.keys():
            if key.startswith(_TENSORS_PREFIX):
                tensors[key[len(_TENSORS_PREFIX):]] = f.get_tensor(key)
                continue
            param, _, name = key[len(_OPTIMIZER_PREFIX):].rpartition("/")
            optimizer_state.setdefault(param, {})[name] = f.get_tensor(key)
    state = TrainState(int(info.pop("step")), [float(x) for x in info.pop("loss_history", [])], optimizer_state,
                       tensors)
    # The state is written before its LoRA: a save killed between the two leaves a newer state
    # beside an older LoRA of the same name. The pair shares an id written with both.
    with safe_open(lora_path, framework="pt") as f:
        lora_id = (f.metadata() or {}).get(_PAIR_KEY)
    if info.pop(_PAIR_KEY, lora_id) != lora_id:
        raise CheckpointError(
            f"cannot resume from {label}: its {os.path.basename(path)} is from another save (step {state.step}; "
            f"a save was interrupted); resume from an earlier "
            f"{_STEP_SUFFIX.sub('', os.path.splitext(label)[0])}_stepNNNNNN checkpoint"
        )
    return state, info


def run_id_of(lora_path: str) -> str | None:
    """The training run a LoRA file belongs to (None: not written by this trainer's runs)."""
    try:
        with safe_open(lora_path, framework="pt") as f:
            return (f.metadata() or {}).get(RUN_ID_KEY)
    except (OSError, SafetensorError):  # an unreadable file belongs to no run
        return None


def run_files(folder: str, name: str) -> list[tuple[int | None, str]]:
    """`(step, path)` of every `<name>.safetensors` (step None) and `<name>_stepNNNNNN.safetensors`
    in `folder`, of any run."""
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.listdir(folder):
        stem, ext = os.path.splitext(entry)
        if ext != LORA_EXTENSION:
            continue
        match = _STEP_SUFFIX.search(stem)
        if match and stem[: match.start()] == name:
            found.append((int(match.group(1)), os.path.join(folder, entry)))
        elif stem == name:
            found.append((None, os.path.join(folder, entry)))
    return sorted(found, key=lambda item: (item[0] is None, item[0] or 0))


def other_runs_files(folder: str, name: str, run_id: str) -> list[str]:
    """The files named like run `run_id`'s (`<name>…`) that another run (or another tool) wrote."""
    return [path for _, path in run_files(folder, name) if run_id_of(path) != run_id]


def delete_checkpoint(lora_path: str) -> None:
    """A LoRA file and its `.trainstate`."""
    for victim in (lora_path, state_path_for(lora_path)):
        if os.path.exists(victim):
            os.remove(victim)


def prune_step_checkpoints(folder: str, name: str, keep_last: int, run_id: str) -> list[str]:
    """Deletes all but the newest `keep_last` `<name>_stepNNNNNN` checkpoints of run `run_id`
    (0 keeps all); other runs' files are never touched. Returns the deleted LoRA paths."""
    if keep_last <= 0:
        return []
    steps = [(step, path) for step, path in run_files(folder, name) if step is not None and run_id_of(path) == run_id]
    deleted = []
    for _, path in steps[:-keep_last]:
        delete_checkpoint(path)
        deleted.append(path)
    return deleted
