"""Core's TorchCompileModel on a FluxQ model inside a REAL ComfyUI server: what users change between
prompts must not recompile, and the pack's code must not break the graph.

Counted from the server's own log (``TORCH_LOGS=recompiles,graph_breaks``), prompt by prompt. The
whole tiny diffusion model is compiled with inductor, as the node does (the CPU compile is the slow
part: one compile per distinct graph, 1 step at 64x64 per prompt)."""

import re

import pytest
import torch
from comfy_server import ComfyServer
from conftest import COMFY_DIR, REPO_ROOT
from fluxq_testing import TINY
from safetensors.torch import load_file, save_file

RECOMPILE = re.compile(r"Recompiling function (\S+) in (\S+)")
# The pack's code as dynamo reports it (ComfyUI imports the pack through a symlink; dynamo prints
# the real path). ComfyUI's own breaks (on the CPU: a psutil `open` in the model's forward) are not
# the pack's to fix.
PACK_CODE = tuple(str(REPO_ROOT.resolve() / folder) + "/" for folder in ("lora_ops", "nodes"))


def _graph_break_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "[__graph_breaks]" in line]


def _pack_graph_breaks(log: str) -> list[str]:
    """Graph-break log lines naming the pack's files (the break's location or its user stack)."""
    return [line for line in _graph_break_lines(log) if any(code in line for code in PACK_CODE)]


@pytest.fixture(scope="module")
def server(scratch_models, tmp_path_factory):
    # PyTorch's attention, as ComfyUI picks on GPUs: its CPU default (sub-quadratic attention) reads
    # the free memory inside the model's forward, a graph break and a recompile whenever it changes,
    # which would hide what this test counts.
    server = ComfyServer(COMFY_DIR, tmp_path_factory.mktemp("compile_server"), extra_model_root=scratch_models,
                         env={"TORCH_LOGS": "recompiles,graph_breaks"}, extra_args=("--use-pytorch-cross-attention",))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def other_rank_lora(scratch_models, models_dir):
    """lora-b at rank 8 (the same layers as the tiny LoRA, another rank)."""
    tensors = load_file(str(models_dir / "loras" / TINY["lora_b"]))
    out = {}
    for key, value in tensors.items():
        if key.endswith("lora_down.weight"):
            out[key] = torch.cat([value, value.flip(1)])
        elif key.endswith("lora_up.weight"):
            out[key] = torch.cat([value, -0.5 * value], dim=1)
        else:
            out[key] = value * 2 if key.endswith(".alpha") else value
    name = "fluxq-tiny-lora-b-rank8.safetensors"
    save_file(out, str(scratch_models / "loras" / name))
    return name


def _prompt(loras, resident="off", remove=None):
    """FluxQLoadGGUF -> FluxQApplyLoRA per (name, strength[, block weights]) -> [FluxQRemoveLoRA] ->
    TorchCompileModel -> KSampler."""
    prompt = {
        "gguf": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY["dev_gguf"]["Q8_0"],
                                                          "dequant_dtype": "auto", "resident": resident}},
        "te": {"class_type": "FluxQLoadTextEncodersGGUF", "inputs": {"clip_name": TINY["clip_l"], "t5_name": "none"}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["te", 0], "text": "a tiny random test"}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    model = ["gguf", 0]
    for i, (name, strength, *block_weights) in enumerate(loras):
        prompt[f"lora{i}"] = {"class_type": "FluxQApplyLoRA", "inputs": {
            "model": model, "lora_name": name, "strength_model": strength, "strength_clip": 0.0,
            **({"block_weights": block_weights[0]} if block_weights else {})}}
        model = [f"lora{i}", 0]
    if remove is not None:
        prompt["remove"] = {"class_type": "FluxQRemoveLoRA", "inputs": {"model": model, "lora_name": remove}}
        model = ["remove", 0]
    prompt["compile"] = {"class_type": "TorchCompileModel", "inputs": {"model": model, "backend": "inductor"}}
    prompt["ks"] = {"class_type": "KSampler", "inputs": {
        "model": ["compile", 0], "positive": ["text", 0], "negative": ["text", 0], "latent_image": ["latent", 0],
        "seed": 3, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "compiled"}}
    return prompt


def _run_and_read_log(server, prompt) -> str:
    """Runs a prompt; the server log lines it added."""
    start = server.log_path.stat().st_size
    server.run(prompt, timeout=900)
    server.log_tail(0)  # flushes the log
    with open(server.log_path, errors="replace") as log:
        log.seek(start)
        return log.read()


def test_what_users_change_between_prompts_does_not_recompile(server, other_rank_lora):
    lora, lora_b = TINY["lora"], other_rank_lora
    first = _run_and_read_log(server, _prompt([(lora, 1.0)]))  # the one compile
    pack_breaks = _pack_graph_breaks(first)
    assert pack_breaks == [], "graph breaks in the pack's code:\n" + "\n".join(pack_breaks)

    changes = {
        "strength change": _prompt([(lora, 0.4)]),
        "a second LoRA of another rank": _prompt([(lora, 0.4), (lora_b, 0.7)]),
        "a LoRA removed": _prompt([(lora, 0.4), (lora_b, 0.7)], remove=lora),
        "the same LoRA re-applied": _prompt([(lora, 0.4), (lora, 0.9)]),
        "strength 0": _prompt([(lora, 0.0)]),
        "a block's weight 0": _prompt([(lora, 0.4, "d0=0")]),
        "block weights changed": _prompt([(lora, 0.4, "d0=0.5, s0=-1")]),
        "every LoRA removed": _prompt([(lora, 0.4)], remove="all"),
    }
    recompiles = {}
    for change, prompt in changes.items():
        log = _run_and_read_log(server, prompt)
        recompiles[change] = [m.group(0) for m in RECOMPILE.finditer(log)]
        assert _pack_graph_breaks(log) == [], change
    assert all(not r for r in recompiles.values()), recompiles


def test_resident_mode_on_and_off_does_not_recompile(server):
    """The resident plan is traced beside the streaming one the first time it is used (it reads a
    kept weight instead of dequantizing: another graph); switching back and forth after that, and
    strength changes in resident mode, reuse the compiled graphs."""
    lora = TINY["lora"]
    _run_and_read_log(server, _prompt([(lora, 1.0)], resident="off"))
    traced = _run_and_read_log(server, _prompt([(lora, 1.0)], resident="on"))
    # The log is read: the resident plan's first use is a recompile of the same code.
    assert RECOMPILE.search(traced), traced[-3000:]
    recompiles = {}
    for change, prompt in {
        "resident off again": _prompt([(lora, 0.6)], resident="off"),
        "resident on again": _prompt([(lora, 0.6)], resident="on"),
        "strength change, resident on": _prompt([(lora, -0.3)], resident="on"),
    }.items():
        recompiles[change] = [m.group(0) for m in RECOMPILE.finditer(_run_and_read_log(server, prompt))]
    assert all(not r for r in recompiles.values()), recompiles
