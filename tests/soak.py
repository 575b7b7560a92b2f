#!/usr/bin/env python3
"""Soak test of a running ComfyUI with the pack: several API clients (threads) submit, for a fixed
time, a mix of valid prompts (load, LoRA apply/remove at changing strengths, a compare grid, a
one-step training run), invalid ones (missing files, corrupt GGUF and LoRA files in the model
folders, NaN strengths, bad lists, names that try to leave the folders) and long ones that they
interrupt mid-sampling or mid-training.

Checked and printed: every valid prompt succeeds with the output the same prompt gave alone on the
quiet server (image pixels from /view, trained LoRA tensors), every invalid one fails with an error
naming what is wrong, interrupted ones end as interrupted (or finished first), the server's RSS
after warm-up and at the end, no temporary files left in the model/output folders, no Python
traceback in the server log outside ComfyUI's own error report.

    python tests/soak.py --seconds 600 --clients 4     # `make soak` (SOAK_SECONDS, SOAK_CLIENTS)

The CI variant is tests/integration/test_soak.py (a short run of the same driver)."""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import psutil  # noqa: E402  (a ComfyUI requirement)
from comfy_server import ComfyServer  # noqa: E402
from fluxq_client import execution_failure, format_validation_error  # noqa: E402
from fluxq_testing import TINY  # noqa: E402
from PIL import Image  # noqa: E402

# Allowed growth of the server's RSS from after warm-up to the end (allocator caches, ComfyUI's
# history of finished prompts); a leak of one model copy (~0.6 GB for the tiny FLUX) exceeds it.
RSS_GROWTH_LIMIT = 0.10
RSS_GROWTH_SLACK = 256 << 20
DATASET = "soak-set"
CORRUPT_GGUF, CORRUPT_LORA = "soak-corrupt.gguf", "soak-corrupt-lora.safetensors"
INTERRUPT_AFTER_S = 1.0  # after the prompt starts running (the loaders are cached: it is sampling/training)


# --- prompts -------------------------------------------------------------------------------------


def base_nodes(steps: int = 1) -> dict:
    return {
        "model": {"class_type": "FluxQLoadGGUF", "inputs": {"gguf_name": TINY["dev_gguf"]["Q8_0"], "dequant_dtype": "auto"}},
        "te": {"class_type": "FluxQLoadTextEncodersGGUF", "inputs": {"clip_name": TINY["clip_l"], "t5_name": "none"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY["vae"]}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["te", 0], "text": "a soak test"}},
        "settings": {"class_type": "FluxQSamplerSettings", "inputs": {
            "preset": "custom", "steps": steps, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple",
            "shift_mode": "auto", "shift": 3.1582, "width": 64, "height": 64, "denoise": 1.0}},
    }


def image_prompt(seed: int = 0, steps: int = 1, loras: tuple = (), remove: str | None = None) -> dict:
    """Base nodes -> FluxQApplyLoRA per (name, strength) -> optional FluxQRemoveLoRA -> sample -> save."""
    prompt, model = base_nodes(steps), ["model", 0]
    for i, (name, strength) in enumerate(loras):
        prompt[f"lora{i}"] = {"class_type": "FluxQApplyLoRA", "inputs": {
            "model": model, "lora_name": name, "strength_model": strength, "strength_clip": 1.0}}
        model = [f"lora{i}", 0]
    if remove is not None:
        prompt["remove"] = {"class_type": "FluxQRemoveLoRA", "inputs": {"model": model, "lora_name": remove}}
        model = ["remove", 0]
    prompt["sample"] = {"class_type": "FluxQSampler", "inputs": {
        "model": model, "positive": ["text", 0], "settings": ["settings", 0], "seed": seed}}
    prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "soak/image"}}
    return prompt


def grid_prompt(strengths: str = "0, 1", seeds: str = "0") -> dict:
    prompt = base_nodes()
    prompt["grid"] = {"class_type": "FluxQCompareGrid", "inputs": {
        "model": ["model", 0], "positive": ["text", 0], "vae": ["vae", 0], "settings": ["settings", 0],
        "lora_name": TINY["lora"], "strengths": strengths, "seeds": seeds}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {"images": ["grid", 0], "filename_prefix": "soak/grid"}}
    return prompt


def training_prompt(lora_name: str, steps: int = 1, dataset: str = DATASET) -> dict:
    prompt = base_nodes()
    prompt["train"] = {"class_type": "FluxQTrainLoRA", "inputs": {
        "model": ["model", 0], "vae": ["vae", 0], "clip": ["te", 0], "dataset": dataset, "trigger_word": "TOK",
        "rank": 2, "alpha": 2.0, "learning_rate": 1e-3, "steps": steps, "batch_size": 1, "gradient_accumulation": 1,
        "resolution": 64, "seed": 5, "optimizer": "adamw", "lr_schedule": "constant", "warmup_steps": 0,
        "caption_dropout": 0.0, "timestep_sampling": "shift", "gradient_checkpointing": False,
        "layer_regex": r"^single_blocks\.0\.linear2$", "save_every": 0, "keep_last": 0, "lora_name": lora_name,
        "resume": "[none]"}}
    return prompt


@dataclass
class Kind:
    """One kind of prompt in the mix. expect: "ok" (and `reference` names the quiet run its output
    must equal), "invalid" (the error must contain every `names` fragment) or "interrupt"."""
    name: str
    make: object  # (serial number) -> prompt
    expect: str
    weight: int
    reference: str | None = None
    names: tuple[str, ...] = ()


def kinds() -> list[Kind]:
    lora, lora_b = TINY["lora"], TINY["lora_b"]
    nan = float("nan")
    return [
        Kind("image seed 0", lambda n: image_prompt(0), "ok", 6, "image seed 0"),
        Kind("image seed 1", lambda n: image_prompt(1), "ok", 4, "image seed 1"),
        Kind("lora 0.5", lambda n: image_prompt(0, loras=((lora, 0.5),)), "ok", 4, "lora 0.5"),
        Kind("lora 1.0 + b -0.7", lambda n: image_prompt(0, loras=((lora, 1.0), (lora_b, -0.7))), "ok", 4,
             "lora 1.0 + b -0.7"),
        # removing every LoRA gives back exactly the base image
        Kind("lora 0.8 removed", lambda n: image_prompt(0, loras=((lora, 0.8), (lora_b, 0.3)), remove="all"), "ok",
             4, "image seed 0"),
        Kind("grid", lambda n: grid_prompt(), "ok", 3, "grid"),
        Kind("train 1 step", lambda n: training_prompt(f"soak-train-{n}"), "ok", 2, "train 1 step"),
        Kind("missing gguf", lambda n: {**image_prompt(), "model": {"class_type": "FluxQLoadGGUF", "inputs": {
            "gguf_name": "soak-missing.gguf", "dequant_dtype": "auto"}}}, "invalid", 2, names=("soak-missing.gguf",)),
        Kind("corrupt gguf", lambda n: {**image_prompt(), "model": {"class_type": "FluxQLoadGGUF", "inputs": {
            "gguf_name": CORRUPT_GGUF, "dequant_dtype": "auto"}}}, "invalid", 2, names=(CORRUPT_GGUF,)),
        Kind("corrupt lora", lambda n: image_prompt(loras=((CORRUPT_LORA, 1.0),)), "invalid", 2, names=(CORRUPT_LORA,)),
        Kind("NaN strength", lambda n: image_prompt(loras=((lora, nan),)), "invalid", 2, names=("strength", "nan")),
        Kind("NaN in grid list", lambda n: grid_prompt(strengths="0, nan"), "invalid", 1, names=("nan",)),
        Kind("bad grid list", lambda n: grid_prompt(seeds="0, x1"), "invalid", 1, names=("x1",)),
        Kind("lora name leaving the folder", lambda n: image_prompt(loras=(("../../" + lora, 1.0),)), "invalid", 1,
             names=("../../" + lora,)),
        Kind("absolute gguf path", lambda n: {**image_prompt(), "model": {"class_type": "FluxQLoadGGUF", "inputs": {
            "gguf_name": "/etc/passwd", "dequant_dtype": "auto"}}}, "invalid", 1, names=("/etc/passwd",)),
        Kind("trained name leaving the folder", lambda n: training_prompt(f"../soak-escape-{n}"), "invalid", 1,
             names=("soak-escape",)),
        Kind("dataset leaving the input folder", lambda n: training_prompt("soak-x", dataset="../" + DATASET), "invalid",
             1, names=("../" + DATASET,)),
        Kind("interrupt sampling", lambda n: image_prompt(seed=n, steps=12), "interrupt", 3),
        Kind("interrupt training", lambda n: training_prompt(f"soak-cut-{n}", steps=6), "interrupt", 2),
    ]


# --- the soak ------------------------------------------------------------------------------------


def lora_tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def view_pixels(server: ComfyServer, entry: dict, node_id: str) -> np.ndarray:
    image = entry["outputs"][node_id]["images"][0]
    return np.asarray(Image.open(io.BytesIO(server.view(image))).convert("RGB"))


def write_bad_files(models: Path, tiny_gguf: Path) -> None:
    """Corrupt files where ComfyUI lists models: a GGUF cut inside its tensor data, a LoRA whose
    safetensors header claims more bytes than the file has."""
    (models / "diffusion_models" / CORRUPT_GGUF).write_bytes(tiny_gguf.read_bytes()[:1 << 20])
    header = json.dumps({"lora_unet_single_blocks_0_linear2.lora_down.weight":
                         {"dtype": "F32", "shape": [2, 3072], "data_offsets": [0, 24576]}}).encode()
    (models / "loras" / CORRUPT_LORA).write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 100)


def write_dataset(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} square")


def temp_leftovers(*folders: Path) -> list[str]:
    """Files of interrupted writes: hidden temporaries and .tmp/.part files."""
    found = []
    for folder in folders:
        for root, _, files in os.walk(folder):
            found += [os.path.join(root, f) for f in files
                      if f.endswith((".tmp", ".part")) or (f.startswith(".") and ".tmp" in f)]
    return found


def unreported_tracebacks(log: str) -> list[str]:
    """Tracebacks not under ComfyUI's "!!! Exception during processing !!!" (its normal report of a
    node's error), and asyncio / aiohttp / thread errors that mean a failure nobody reported."""
    lines, found, reports = log.splitlines(), [], []  # line numbers of reports not yet matched
    for i, line in enumerate(lines):
        if "!!! Exception during processing !!!" in line:
            reports.append(i)
        elif "Traceback (most recent call last)" in line:
            # the server's threads log concurrently: a report's traceback may follow a few lines later
            while reports and i - reports[0] > 20:
                reports.pop(0)  # a report without a traceback
            if reports:
                reports.pop(0)
            else:
                found.append("\n".join(lines[max(0, i - 3):i + 25]))
        elif re.search(r"Exception in thread|Task exception was never retrieved|Error handling request|"
                       r"exception was never retrieved|Unclosed client session", line):
            found.append(line)
    return found


@dataclass
class Report:
    seconds: float = 0.0
    clients: int = 0
    submitted: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)  # (kind, outcome)
    interrupted_in: collections.Counter = field(default_factory=collections.Counter)  # node class
    errors: dict = field(default_factory=dict)  # kind -> the first error message
    compared: int = 0
    compared_recomputed: int = 0
    warm_up_s: float = 0.0
    busy_s: float = 0.0  # the server's own "Prompt executed in" times during the soak
    rss_warm: int = 0
    rss_end: int = 0
    rss_max: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return sum(self.outcomes.values())

    def text(self) -> str:
        mb = 1 << 20
        lines = [f"soak: {self.seconds:.0f} s, {self.clients} clients, {self.completed} prompts completed "
                 f"({sum(n for (k, o), n in self.outcomes.items() if o == 'succeeded')} succeeded); warm-up "
                 f"{self.warm_up_s:.0f} s, server busy executing {self.busy_s:.0f} s"]
        for (kind, outcome), n in sorted(self.outcomes.items()):
            lines.append(f"  {kind:34s} {outcome:28s} {n:4d}")
        lines.append("  first error of each invalid kind:")
        lines += [f"    {kind}: {' | '.join(message.splitlines())[:300]}" for kind, message in sorted(self.errors.items())]
        lines.append(f"  interrupts landed in: {dict(self.interrupted_in) or 'none'}")
        lines.append(f"  outputs compared with the quiet run: {self.compared} "
                     f"({self.compared_recomputed} recomputed, the rest from ComfyUI's cache)")
        lines.append(f"  server RSS: {self.rss_warm / mb:.0f} MiB after warm-up, {self.rss_end / mb:.0f} MiB at the end "
                     f"(max {self.rss_max / mb:.0f} MiB; growth {(self.rss_end - self.rss_warm) / mb:+.0f} MiB, "
                     f"limit {RSS_GROWTH_LIMIT:.0%} + {RSS_GROWTH_SLACK / mb:.0f} MiB)")
        lines.append(f"  problems: {len(self.problems)}")
        lines += [f"    - {p}" for p in self.problems]
        return "\n".join(lines)


class Soak:
    def __init__(self, server: ComfyServer, models: Path, seconds: float, clients: int, seed: int = 0):
        self.server, self.models, self.seconds, self.clients = server, models, seconds, clients
        self.kinds = kinds()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.serial = 0
        self.order = list(self.kinds)  # every kind once first, then at random by weight
        self.references: dict[str, object] = {}
        self.report = Report(seconds=seconds, clients=clients)
        self.process = psutil.Process(server.process.pid)

    # one prompt

    def submit(self, prompt: dict) -> tuple[str | None, str | None]:
        """(prompt id, None) or (None, the validation error text)."""
        status, body = self.server.post_prompt(prompt)
        if status == 200:
            return body["prompt_id"], None
        return None, format_validation_error(body, prompt)

    def wait_running(self, prompt_id: str, timeout: float = 600) -> bool:
        """Until the prompt runs (True) or has finished without being seen running (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            queue = self.server.get("/queue")
            if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
                return True
            if not any(item[1] == prompt_id for item in queue.get("queue_pending", [])):
                return False
            time.sleep(0.05)
        raise TimeoutError(f"prompt {prompt_id} did not start in {timeout}s")

    def output(self, entry: dict, prompt: dict):
        """The trained LoRA's tensors, or the saved image's pixels."""
        if "train" in prompt:
            return lora_tensors(self.models / "loras" / f"{prompt['train']['inputs']['lora_name']}.safetensors")
        return view_pixels(self.server, entry, "save")

    @staticmethod
    def same(a, b) -> bool:
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        return a.shape == b.shape and np.array_equal(a, b)

    def run_one(self, kind: Kind, serial: int) -> None:
        prompt = kind.make(serial)
        prompt_id, rejected = self.submit(prompt)
        outcome, message = "rejected at validation", rejected
        if prompt_id is not None:
            if kind.expect == "interrupt" and self.wait_running(prompt_id):
                time.sleep(INTERRUPT_AFTER_S)
                self.server.post("/interrupt", {"prompt_id": prompt_id})
            entry = self.server.wait(prompt_id)
            message = execution_failure(entry, prompt)
            messages = dict((k, v) for k, v in entry["status"].get("messages", []))
            if message is None:
                outcome = "succeeded"
            elif "execution_interrupted" in messages:
                outcome = "interrupted"
                with self.lock:
                    self.report.interrupted_in[messages["execution_interrupted"].get("node_type", "?")] += 1
            else:
                outcome = "failed in execution"
        with self.lock:
            self.report.outcomes[(kind.name, outcome)] += 1
            if kind.expect == "invalid" and message:
                self.report.errors.setdefault(kind.name, message)
        where = f"{kind.name} (#{serial})"
        if kind.expect == "ok":
            if outcome != "succeeded":
                return self.problem(f"{where}: valid prompt {outcome}: {message}")
            output = self.output(entry, prompt)
            if not self.same(output, self.references[kind.reference]):
                return self.problem(f"{where}: output differs from the same prompt run alone")
            cached = set(dict(entry["status"].get("messages", [])).get("execution_cached", {}).get("nodes", []))
            with self.lock:
                self.report.compared += 1
                self.report.compared_recomputed += not ({"sample", "grid", "train"} & cached)
        elif kind.expect == "invalid":
            if outcome == "succeeded":
                return self.problem(f"{where}: invalid prompt succeeded")
            if outcome == "interrupted":
                return self.problem(f"{where}: invalid prompt reported as interrupted: {message}")
            missing = [n for n in kind.names if n.lower() not in message.lower()]
            if missing:
                self.problem(f"{where}: error does not name {missing}: {message[:400]}")
        elif outcome not in ("interrupted", "succeeded"):
            self.problem(f"{where}: {outcome}: {message}")

    def problem(self, text: str) -> None:
        with self.lock:
            self.report.problems.append(text)

    # the phases

    def next_kind(self) -> tuple[Kind, int]:
        with self.lock:
            self.serial += 1
            if self.order:
                return self.order.pop(0), self.serial
            return self.rng.choices(self.kinds, weights=[k.weight for k in self.kinds])[0], self.serial

    def warm_up(self) -> None:
        """Every valid prompt alone on the quiet server: the outputs the soak must reproduce."""
        for kind in self.kinds:
            if kind.expect == "ok" and kind.reference == kind.name:
                prompt = kind.make(0)  # the soak's serial numbers start at 1: a training name of its own
                prompt_id, rejected = self.submit(prompt)
                if prompt_id is None:
                    raise RuntimeError(f"{kind.name} refused at warm-up: {rejected}")
                entry = self.server.wait(prompt_id)
                if (message := execution_failure(entry, prompt)) is not None:
                    raise RuntimeError(f"{kind.name} failed at warm-up: {message}")
                self.references[kind.name] = self.output(entry, prompt)

    def client(self, deadline: float) -> None:
        while time.time() < deadline or self.order:  # a short run still tries every kind once
            kind, serial = self.next_kind()
            with self.lock:
                self.report.submitted[kind.name] += 1
            try:
                self.run_one(kind, serial)
            except Exception as error:  # a broken connection, a timeout: the server misbehaved
                self.problem(f"{kind.name} (#{serial}): {type(error).__name__}: {error}")

    def sample_rss(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            self.report.rss_max = max(self.report.rss_max, self.process.memory_info().rss)

    def run(self) -> Report:
        started = time.time()
        self.warm_up()
        self.report.warm_up_s = time.time() - started
        log_start = self.server.log_path.stat().st_size
        self.report.rss_warm = self.report.rss_max = self.process.memory_info().rss
        stop = threading.Event()
        sampler = threading.Thread(target=self.sample_rss, args=(stop,), daemon=True)
        sampler.start()
        deadline = time.time() + self.seconds
        threads = [threading.Thread(target=self.client, args=(deadline,)) for _ in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stop.set()
        sampler.join()
        self.report.rss_end = self.process.memory_info().rss
        self.check_the_server(log_start)
        return self.report

    def check_the_server(self, log_start: int) -> None:
        report = self.report
        if report.rss_end > report.rss_warm * (1 + RSS_GROWTH_LIMIT) + RSS_GROWTH_SLACK:
            self.problem(f"server RSS grew from {report.rss_warm >> 20} MiB to {report.rss_end >> 20} MiB")
        for leftover in temp_leftovers(self.models, self.server.output_dir, self.server.input_dir):
            self.problem(f"temporary file left behind: {leftover}")
        escaped = [str(p) for p in self.models.parent.rglob("soak-escape*")]
        if escaped:
            self.problem(f"files written outside their folder: {escaped}")
        self.server._log.flush()
        with open(self.server.log_path, errors="replace") as log:
            log.seek(log_start)
            text = log.read()
            self.report.busy_s = sum(float(t) for t in re.findall(r"Prompt executed in ([0-9.]+) seconds", text))
            for traceback in unreported_tracebacks(text):
                self.problem(f"unreported error in the server log:\n{traceback}")
        self.server.get("/system_stats")  # still serving


def prepare(root: Path) -> Path:
    """The model folders the soak server saves into and reads the corrupt files from."""
    models = root / "models"
    for folder in ("loras", "diffusion_models", "text_encoders"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    return models


def run_soak(comfy_dir: Path, root: Path, seconds: float, clients: int, seed: int = 0) -> Report:
    models = prepare(root)
    write_bad_files(models, comfy_dir / "models" / "diffusion_models" / TINY["dev_gguf"]["Q8_0"])
    (root / "server").mkdir()
    server = ComfyServer(comfy_dir, root / "server", extra_model_root=models, extra_models_first=True)
    try:
        write_dataset(server.input_dir / DATASET)
        return Soak(server, models, seconds, clients, seed).run()
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="how long the clients submit (default 600)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent API clients (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mix")
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_PATH") or
                                                                  HERE.parent / ".harness" / "ComfyUI"))
    parser.add_argument("--keep-log", type=Path, help="copy the server's log here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fluxq-soak-") as root:
        started = time.time()
        try:
            report = run_soak(args.comfyui, Path(root), args.seconds, args.clients, args.seed)
        finally:
            if args.keep_log:
                shutil.copy(Path(root) / "server" / "comfyui.log", args.keep_log)
        print(report.text())
        print(f"(wall time {time.time() - started:.0f} s including start and warm-up)")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
