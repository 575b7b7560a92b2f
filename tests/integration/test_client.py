"""The headless client (scripts/fluxq_client.py): its helpers, and its success and failure paths
against the real ComfyUI server from tests/conftest.py."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from comfy_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT = REPO_ROOT / "scripts" / "fluxq_client.py"
TINY_MAP = REPO_ROOT / "scripts" / "tiny_model_map.json"
DEV_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux_dev_gguf_lora_txt2img.json"
DEV_WORKFLOW_UI = REPO_ROOT / "workflows" / "flux_dev_gguf_lora_txt2img.json"
# Tiny-model sizes for the dev workflow; the shipped file keeps the real 1024x1024 / 28 steps.
TINY_DEV = ["Sampler settings.preset=custom", "Sampler settings.steps=2",
            "Sampler settings.width=64", "Sampler settings.height=64"]


def load_client():
    spec = importlib.util.spec_from_file_location("fluxq_client", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = load_client()


def set_args(overrides) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def run_client(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLIENT), *args], capture_output=True, text=True, timeout=timeout)


# --- helpers, no server -------------------------------------------------------------------------


def sample_prompt():
    return {
        "1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["2", 0]}, "_meta": {"title": "Prompt"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}, "_meta": {"title": "Load VAE"}},
        "3": {"class_type": "FluxQSampler", "inputs": {"seed": 1}, "_meta": {"title": "Sampler.v2"}},
    }


OBJECT_INFO = {  # the declarations /object_info gives for sample_prompt's nodes
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}}},
    "VAELoader": {"input": {"required": {"vae_name": [["ae.safetensors", "x.safetensors"], {}]}}},
    "FluxQSampler": {"input": {"required": {"seed": ["INT", {}], "settings": ["FLUX_SAMPLER_SETTINGS", {}]},
                               "optional": {"denoise": ["FLOAT", {}], "flag": ["BOOLEAN", {}],
                                            "steps": ["COMBO", {"options": [4, 8]}]}}},
}


@pytest.mark.parametrize("node, text, value", [
    ("Sampler.v2.seed", "7", 7), ("Sampler.v2.denoise", "0.5", 0.5), ("Sampler.v2.flag", "true", True),
    ("Sampler.v2.steps", "8", 8), ("Sampler.v2.settings", '["4", 0]', ["4", 0]),
    # strings stay strings: these used to reach the prompt as the strings None / True / nan
    ("Prompt.text", "null", "null"), ("Prompt.text", "true", "true"), ("Prompt.text", "NaN", "NaN"),
    ("Prompt.text", '"0"', '"0"'), ("Prompt.text", "[1, 2]", "[1, 2]"), ("Load VAE.vae_name", "0", "0"),
    ("Prompt.undeclared", "null", "null"),
])
def test_set_values_take_the_type_the_server_declares(node, text, value):
    prompt = sample_prompt()
    client.apply_overrides(prompt, [f"{node}={text}"], OBJECT_INFO)
    node_ref, _, input_name = node.rpartition(".")
    assert prompt[client.find_node(prompt, node_ref)]["inputs"][input_name] == value


@pytest.mark.parametrize("override, message", [
    ("Sampler.v2.seed=1.5", "INT input takes a whole number"), ("Sampler.v2.denoise=NaN", "FLOAT input takes a finite"),
    ("Sampler.v2.flag=None", "BOOLEAN input takes true or false"),
])
def test_set_values_that_do_not_fit_the_declared_type_are_usage_errors(override, message):
    with pytest.raises(client.ClientError, match=message) as caught:
        client.apply_overrides(sample_prompt(), [override], OBJECT_INFO)
    assert caught.value.exit_code == client.EXIT_USAGE


def test_set_finds_nodes_by_id_or_title_and_titles_may_contain_dots():
    prompt = sample_prompt()
    client.apply_overrides(prompt, ["Prompt.text=a cat=dog", "2.vae_name=x.safetensors", "Sampler.v2.seed=9"], OBJECT_INFO)
    assert prompt["1"]["inputs"]["text"] == "a cat=dog"
    assert prompt["2"]["inputs"]["vae_name"] == "x.safetensors"
    assert prompt["3"]["inputs"]["seed"] == 9


@pytest.mark.parametrize("override, message", [("Nope.text=1", "no node with id or title 'Nope'"),
                                               ("Prompt=1", "expected NODE.input=value"),
                                               ("Prompt.text", "expected NODE.input=value")])
def test_bad_set_is_a_usage_error(override, message):
    with pytest.raises(client.ClientError, match=message) as caught:
        client.apply_overrides(sample_prompt(), [override], OBJECT_INFO)
    assert caught.value.exit_code == client.EXIT_USAGE


def test_ambiguous_title_asks_for_an_id():
    prompt = sample_prompt()
    prompt["2"]["_meta"]["title"] = "Prompt"
    with pytest.raises(client.ClientError, match="used by nodes 1, 2"):
        client.apply_overrides(prompt, ["Prompt.text=x"], OBJECT_INFO)


def test_value_map_replaces_equal_values_only_and_leaves_links_alone():
    prompt = sample_prompt()
    client.apply_value_map(prompt, {"ae.safetensors": "tiny-ae.safetensors", "a": "b", "2": "9"})
    assert prompt["2"]["inputs"]["vae_name"] == "tiny-ae.safetensors"
    assert prompt["1"]["inputs"] == {"text": "a fox", "clip": ["2", 0]}


@pytest.mark.parametrize("subfolder, filename, expected", [
    ("", "grid_00001_.png", "grid_00001_.png"),
    ("fluxq", "dev_00001_.png", "fluxq_dev_00001_.png"),
    ("../../etc", "passwd", "etc_passwd"),
    ("", "../../../x.png", "x.png"),
    ("/abs", "..\\..\\evil name?.png", "abs_evil_name_.png"),
    ("", "..", "output"),
])
def test_downloaded_files_get_safe_names_inside_the_output_folder(tmp_path, subfolder, filename, expected):
    path = client.safe_local_path(tmp_path, subfolder, filename)
    assert path == tmp_path / expected
    path.write_bytes(b"x")
    assert client.safe_local_path(tmp_path, subfolder, filename).parent == tmp_path  # no overwrite: a new name


def test_output_files_lists_every_file_once():
    entry = {"outputs": {
        "9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}], "text": ["hello"]},
        "10": {"latents": [{"filename": "b.latent", "subfolder": "s", "type": "output"}],
               "images": [{"filename": "a.png", "subfolder": "", "type": "output"}]},
        "11": {"images": [{"filename": "a.png", "subfolder": "", "type": "temp"}]},
    }}
    assert [(f["type"], f["filename"]) for f in client.output_files(entry)] == [
        ("output", "a.png"), ("output", "b.latent"), ("temp", "a.png")]


def test_downloads_keep_outputs_and_skip_previews_already_gone(tmp_path):
    from aiohttp import web

    async def view(request):
        if request.query["type"] == "output":
            return web.Response(body=b"png bytes")
        raise web.HTTPNotFound()

    async def download():
        app = web.Application()
        app.router.add_get("/view", view)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        entry = {"outputs": {"1": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"},
                                              {"filename": "p.png", "subfolder": "", "type": "temp"}]}}}
        try:
            async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}/") as session:
                return await client.download_outputs(session, entry, tmp_path)
        finally:
            await runner.cleanup()

    assert asyncio.run(download()) == [tmp_path / "a.png"]
    assert (tmp_path / "a.png").read_bytes() == b"png bytes"


def test_help_shows_usage():
    result = run_client("--help")
    assert result.returncode == 0
    assert "--set NODE.input=value" in result.stdout and "--map" in result.stdout and "Exit status" in result.stdout


def test_help_states_how_long_a_dead_server_is_waited_for():
    result = run_client("--help")
    assert "--reconnect-timeout" in result.stdout and "(default 60)" in result.stdout
    assert "fails the run within S + 45 s" in " ".join(result.stdout.split())


def test_unreadable_workflow_is_a_usage_error(tmp_path):
    result = run_client(str(tmp_path / "missing.json"), "--server", "http://127.0.0.1:9")
    assert result.returncode == client.EXIT_USAGE
    assert "cannot read workflow" in result.stderr


# --- against the real server --------------------------------------------------------------------


@pytest.mark.server
def test_missing_model_is_the_servers_validation_error_and_exit_1(comfy_server, tmp_path):
    # The shipped workflow names the real FLUX files, which the test server does not have.
    result = run_client(str(DEV_WORKFLOW), "--server", comfy_server.url, "--out", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "server rejected the prompt: Prompt outputs failed validation" in result.stderr
    # ComfyUI names the first missing file it meets on each output's path, with the node it is on.
    real_names = "|".join(re.escape(name) for name in json.loads(TINY_MAP.read_text()))
    assert re.search(rf'node \d+ "[^"]+" \(\w+\): .*\'({real_names})\'', result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.server
def test_deliberately_broken_workflow_names_the_missing_lora(comfy_server, tmp_path):
    broken = json.loads(DEV_WORKFLOW.read_text())
    lora_node = next(node for node in broken.values() if node["class_type"] == "FluxQApplyLoRA")
    lora_node["inputs"]["lora_name"] = "deleted_lora.safetensors"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = run_client(str(path), "--server", comfy_server.url, "--map", str(TINY_MAP), *set_args(TINY_DEV),
                        "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    # Rejected before anything runs (the pack's loaders check their file dropdowns themselves:
    # ComfyUI 0.3.75 does not check V3 combo values), naming the node and the file.
    assert "server rejected the prompt" in result.stderr
    assert 'node 4 "Apply LoRA" (FluxQApplyLoRA)' in result.stderr and "'deleted_lora.safetensors'" in result.stderr
    assert "queued prompt" not in result.stderr


@pytest.mark.server
def test_execution_error_exits_1_with_the_exception_and_node(comfy_server, tmp_path):
    overrides = [*TINY_DEV, "Sampler settings.width=72"]  # passes validation, refused when the node runs
    result = run_client(str(DEV_WORKFLOW), "--server", comfy_server.url, "--map", str(TINY_MAP),
                        *set_args(overrides), "--out", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert 'execution failed at node' in result.stderr
    assert '"Sampler settings" (FluxQSamplerSettings): ValueError: width 72 is not a multiple of 16' in result.stderr


@pytest.mark.server
def test_ui_workflow_runs_through_the_client_and_outputs_are_downloaded(comfy_server, tmp_path):
    out = tmp_path / "out"
    result = run_client(str(DEV_WORKFLOW_UI), "--server", comfy_server.url, "--map", str(TINY_MAP),
                        *set_args(TINY_DEV), "--set", "Prompt.text=a tiny fox",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = [Path(line) for line in result.stdout.split()]
    assert saved and all(path.parent == out and path.suffix == ".png" and path.stat().st_size > 0 for path in saved)
    assert "finished" in result.stderr and "nodes]" in result.stderr  # the progress lines


@pytest.mark.server
def test_timeout_cancels_the_prompt_and_exits_3(comfy_server, tmp_path):
    overrides = [*TINY_DEV, "Sampler settings.steps=50", "Sampler.seed=123456"]  # long enough to still be running
    result = run_client(str(DEV_WORKFLOW), "--server", comfy_server.url, "--map", str(TINY_MAP),
                        *set_args(overrides), "--timeout", "1", "--out", str(tmp_path))
    assert result.returncode == client.EXIT_TIMEOUT, result.stderr
    assert "timed out after 1 s" in result.stderr
    queue = comfy_server.get("/queue")
    assert queue["queue_pending"] == []


@pytest.mark.server
def test_set_types_values_from_the_servers_object_info(comfy_server):
    result = run_client(str(DEV_WORKFLOW), "--server", comfy_server.url, "--print-prompt",
                        "--set", "Prompt.text=null", "--set", "Sampler.seed=7", "--set", "Sampler settings.denoise=1")
    assert result.returncode == 0, result.stderr
    prompt = json.loads(result.stdout)
    by_title = {node["_meta"]["title"]: node["inputs"] for node in prompt.values()}
    assert by_title["Prompt"]["text"] == "null"
    assert by_title["Sampler"]["seed"] == 7 and by_title["Sampler settings"]["denoise"] == 1.0
    result = run_client(str(DEV_WORKFLOW), "--server", comfy_server.url, "--print-prompt", "--set", "Sampler.seed=NaN")
    assert result.returncode == client.EXIT_USAGE and "INT input takes a whole number" in result.stderr


@pytest.mark.server
def test_an_output_dropped_by_validation_fails_the_run_unless_partial_is_allowed(comfy_server, tmp_path):
    """ComfyUI accepts (HTTP 200) a prompt in which one output fails validation and runs only the
    others, listing the failures in `node_errors`: the client used to exit 0 with half the outputs."""
    prompt = {  # core nodes only: what matters is the server's answer, not the render
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 255},
              "_meta": {"title": "Canvas"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "kept"},
              "_meta": {"title": "Save canvas"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "missing_reference.png"},
              "_meta": {"title": "Reference photo"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "reference"},
              "_meta": {"title": "Save reference"}},
    }
    path = tmp_path / "two_outputs.json"
    path.write_text(json.dumps(prompt))
    dropped_line = re.compile(r'node 3 "Reference photo" \(LoadImage\): .*missing_reference\.png.*'
                              r'\(drops node 4 "Save reference" \(SaveImage\)\)')

    strict = run_client(str(path), "--server", comfy_server.url, "--out", str(tmp_path / "strict"))
    assert strict.returncode == 1, strict.stderr
    assert "the server dropped outputs that failed validation" in strict.stderr, strict.stderr
    assert dropped_line.search(strict.stderr), strict.stderr
    assert not (tmp_path / "strict").exists()

    partial = run_client(str(path), "--server", comfy_server.url, "--allow-partial", "--out", str(tmp_path / "partial"))
    assert partial.returncode == 0, partial.stderr
    assert "warning: prompt" in partial.stderr and dropped_line.search(partial.stderr), partial.stderr
    saved = [Path(line) for line in partial.stdout.split()]
    assert len(saved) == 1 and saved[0].name.startswith("kept") and saved[0].stat().st_size > 0


@pytest.mark.server
def test_a_server_that_dies_fails_within_the_reconnect_window_and_a_restart_is_reported_lost(
        comfy_server, scratch_models, tmp_path):
    """Two clients on one server, which then goes away. Their websocket drops; the one whose
    --reconnect-timeout (3 s) passes first fails then: it used to retry until --timeout (default
    an hour) for a server that never returns. The other sees the server come back without its
    prompt: it used to poll /history until --timeout and end with "prompt cancelled"."""
    import time

    from comfy_server import ComfyServer

    def start_server(name):
        (tmp_path / name).mkdir()
        return ComfyServer(comfy_server.comfy_dir, tmp_path / name, extra_model_root=scratch_models, port=port)

    def start_client(reconnect_timeout, out):
        overrides = [*TINY_DEV, "Sampler settings.steps=50"]  # still running when the server goes away
        return subprocess.Popen(
            [sys.executable, str(CLIENT), str(DEV_WORKFLOW), "--server", first.url, "--map", str(TINY_MAP),
             *set_args(overrides), "--timeout", "900", "--reconnect-timeout", reconnect_timeout,
             "--out", str(tmp_path / out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    port = free_port()
    first = start_server("first")
    abandoned, restarted = start_client("3", "abandoned"), start_client("300", "restarted")
    second = None
    try:
        deadline = time.time() + 300
        while len(first.get("/queue")["queue_running"] + first.get("/queue")["queue_pending"]) < 2:
            assert time.time() < deadline and abandoned.poll() is None and restarted.poll() is None, \
                "the prompts were never queued"
            time.sleep(0.5)
        first.stop()
        gone = time.monotonic()
        _, abandoned_err = abandoned.communicate(timeout=120)
        gave_up = time.monotonic() - gone
        second = start_server("second")
        back = time.monotonic()
        _, stderr = restarted.communicate(timeout=60)
        waited = time.monotonic() - back
    finally:
        for process in (abandoned, restarted):
            process.kill()
        for server in (first, second):
            if server is not None and server.process.poll() is None:
                server.stop()
    assert abandoned.returncode == client.EXIT_FAILED, abandoned_err
    assert "the server did not come back within 3 s" in abandoned_err, abandoned_err
    assert gave_up < 3 + 15, f"the client gave up {gave_up:.0f} s after the server went away"
    assert restarted.returncode == client.EXIT_FAILED, stderr
    assert "is lost: the server has it neither queued, running nor in its history" in stderr, stderr
    assert waited < 30, f"the client needed {waited:.0f} s after the server came back"

