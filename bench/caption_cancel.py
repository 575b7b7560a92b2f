"""How long FluxQPrepareDataset takes to end after a cancel while captioning (docs/RELIABILITY.md §5).

Starts a ComfyUI server (the harness's, or COMFYUI_PATH) and the caption stub of the tests on
loopback ports, and for each way an endpoint can keep a worker waiting (429 with Retry-After 30 s,
silent for 40 s, trickling a byte per 0.1 s) queues a two-image preparation, presses cancel
(POST /interrupt) once both requests are at the stub, and prints the seconds until the prompt has
ended in /history (polled every 0.3 s). Run with the harness's Python:

    .harness/venv/bin/python bench/caption_cancel.py
    COMFYUI_PATH=$PWD/.harness/0.33.0/ComfyUI .harness/0.33.0/venv/bin/python bench/caption_cancel.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from caption_stub import SERVER_ENV, CaptionStub
from comfy_server import ComfyServer
from PIL import Image

CASES = {
    "Retry-After 30 s": [("status", 429, {"Retry-After": "30"})],
    "silent endpoint": [("sleep", 40.0)],
    "trickling endpoint": [("trickle", 40.0)],
}
REPEATS = 3


def main() -> None:
    comfy = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".harness" / "ComfyUI")
    server = ComfyServer(comfy, Path(tempfile.mkdtemp(prefix="fluxq_cancel_")), env=SERVER_ENV)
    stub = CaptionStub()
    try:
        for case, script in CASES.items():
            seconds = [cancel_once(server, stub, script * 20) for _ in range(REPEATS)]
            print(f"{case}: " + ", ".join(f"{s:.2f}" for s in seconds) + " s", flush=True)
    finally:
        stub.close()
        server.stop()


def cancel_once(server: ComfyServer, stub: CaptionStub, script: list[tuple]) -> float:
    source = f"cancel_{uuid.uuid4().hex[:6]}"
    (server.input_dir / source).mkdir()
    for n, rgb in enumerate([(200, 0, 0), (0, 0, 200)]):
        Image.new("RGB", (256, 256), rgb).save(server.input_dir / source / f"{n}.png")
    stub.requests.clear()
    stub.script = script
    inputs = dict(source=source, output_name="", min_side=128, max_side=2048, background="white",
                  caption_mode="overwrite", captioner="openai-compatible", trigger_word="TOK",
                  trigger_placement="start", caption_prefix="", caption_suffix="", template="",
                  endpoint_url=stub.base_url, model=stub.model, api_key_env="", instruction="Describe the image.",
                  temperature=0.2, max_tokens=120, concurrency=2, timeout=60.0, on_caption_error="fail")
    status, body = server.post_prompt({"prep": {"class_type": "FluxQPrepareDataset", "inputs": inputs}})
    if status != 200:
        raise RuntimeError(f"prompt refused: {body}")
    deadline = time.monotonic() + 120
    while len(stub.requests) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the captions were never asked for")
        time.sleep(0.02)
    time.sleep(1.0)  # both workers are now waiting
    started = time.monotonic()
    server.post("/interrupt", {"prompt_id": body["prompt_id"]})
    server.wait(body["prompt_id"], timeout=600)
    return time.monotonic() - started


if __name__ == "__main__":
    main()
