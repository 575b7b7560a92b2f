"""Start a real ComfyUI server (with this pack) on a free loopback port and drive it over HTTP.

Used by the demo (scripts/demo.py) and the tests; standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ExecutionFailed(RuntimeError):
    """The server refused the prompt or its execution failed; the message is the server's."""


class ComfyServer:
    """A real ComfyUI server process with the pack, driven over HTTP."""

    def __init__(self, comfy_dir: Path, workdir: Path, extra_model_root: Path | None = None, cpu: bool = True,
                 extra_models_first: bool = False, port: int | None = None, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.comfy_dir = comfy_dir
        self.port = port or free_port()  # a given port: a server restarted where a client expects it
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_dir = workdir / "output"
        self.input_dir = workdir / "input"
        self.output_dir.mkdir()
        self.input_dir.mkdir()
        command = [sys.executable, "main.py", *(["--cpu"] if cpu else []), "--listen", "127.0.0.1",
                   "--port", str(self.port), "--disable-auto-launch", "--output-directory", str(self.output_dir),
                   "--input-directory", str(self.input_dir),
                   # ComfyUI empties its temp folder at start: a private one per server
                   "--temp-directory", str(workdir / "temp"), *extra_args]
        if extra_model_root is not None:
            extra = workdir / "extra_model_paths.yaml"
            extra.write_text(
                "fluxq_extra:\n"
                f"    base_path: {extra_model_root}\n"
                # first: the folders files are saved into (e.g. the trainer's loras)
                + ("    is_default: true\n" if extra_models_first else "")
                + "    loras: loras\n    diffusion_models: diffusion_models\n    text_encoders: text_encoders\n"
            )
            command += ["--extra-model-paths-config", str(extra)]
        self.log_path = workdir / "comfyui.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=120) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        data = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def post(self, path: str, payload: dict) -> None:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            r.read()

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The /history entry of a queued prompt once it has finished (succeeded, failed or interrupted)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue ``prompt``, wait for it, return its /history entry; raise ExecutionFailed on error."""
        status, body = self.post_prompt(prompt)
        if status != 200:
            raise ExecutionFailed(f"validation failed: {json.dumps(body)[:2000]}")
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"].get("status_str") == "error":
            errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            raise ExecutionFailed(errors[0]["exception_message"] if errors else "execution failed")
        return entry

    def output_file(self, file_info: dict) -> Path:
        return self.output_dir / file_info.get("subfolder", "") / file_info["filename"]

    def view(self, file_info: dict) -> bytes:
        query = urllib.parse.urlencode({k: file_info.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.get("/view?" + query)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
