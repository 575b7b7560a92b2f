"""The headless client spreading a batch over several real ComfyUI servers, one killed mid-batch."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from comfy_server import ComfyServer, free_port
from test_client import CLIENT, REPO_ROOT, client

COMFY_DIR = Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".harness" / "ComfyUI")
SCHNELL = REPO_ROOT / "workflows" / "api" / "flux_schnell_gguf_4step.json"
# the tiny schnell GGUF at 64x64, one step: the cheapest real render
TINY = ["--map", str(REPO_ROOT / "scripts" / "tiny_model_map.json"),
        "--set", "Sampler settings.preset=custom", "--set", "Sampler settings.steps=1",
        "--set", "Sampler settings.width=64", "--set", "Sampler settings.height=64"]
SEEDS = "--sweep", "Sampler.seed=[0, 1, 2, 3, 4, 5]"


def test_jobs_are_batch_lines_times_sweep_values(tmp_path):
    batch = tmp_path / "jobs.jsonl"
    batch.write_text('{"Prompt.text": "a fox"}\n\n{"Prompt.text": "a cat", "Sampler.seed": 9}\n')
    args = argparse.Namespace(batch=str(batch), sweep=["Sampler.seed=[1, 2]", "Sampler settings.steps=[4]"])
    assert client.batch_jobs(args) == [
        ['Prompt.text="a fox"', "Sampler.seed=1", "Sampler settings.steps=4"],
        ['Prompt.text="a fox"', "Sampler.seed=2", "Sampler settings.steps=4"],
        ['Prompt.text="a cat"', "Sampler.seed=9", "Sampler.seed=1", "Sampler settings.steps=4"],
        ['Prompt.text="a cat"', "Sampler.seed=9", "Sampler.seed=2", "Sampler settings.steps=4"],
    ]


@pytest.mark.parametrize("batch_text,sweep,message", [
    (None, ["Sampler.seed=3"], "expected NODE.input=[value, ...]"),
    (None, ["Sampler.seed=[]"], "expected NODE.input=[value, ...]"),
    ("[1, 2]\n", [], "line 1: expected an object"),
    ("{oops\n", [], "line 1: not JSON"),
    ("\n", [], "holds no jobs"),
])
def test_bad_batch_or_sweep_is_a_usage_error(tmp_path, batch_text, sweep, message):
    batch = None
    if batch_text is not None:
        batch = tmp_path / "jobs.jsonl"
        batch.write_text(batch_text)
    args = argparse.Namespace(batch=batch and str(batch), sweep=sweep)
    with pytest.raises(client.ClientError, match=re.escape(message)) as error:
        client.batch_jobs(args)
    assert error.value.exit_code == client.EXIT_USAGE


def start_servers(count: int, scratch_models, tmp_path_factory) -> list[ComfyServer]:
    """Started side by side (each takes tens of seconds to answer)."""
    servers: list[ComfyServer | None] = [None] * count
    errors = []

    def start(i):
        try:
            servers[i] = ComfyServer(COMFY_DIR, tmp_path_factory.mktemp(f"batch_server{i}"), extra_model_root=scratch_models)
        except Exception as e:  # reported below, after the other has started or failed
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for server in servers:
            if server is not None:
                server.stop()
        raise errors[0]
    return servers


def job_outputs(out: Path) -> dict[str, list[bytes]]:
    """Each job's files by content: the names carry each server's own SaveImage counter."""
    return {job.name: sorted(f.read_bytes() for f in job.iterdir()) for job in sorted(out.iterdir())}


@pytest.mark.server
def test_batch_over_three_servers_with_one_killed_completes_every_prompt_once(comfy_server, scratch_models,
                                                                               tmp_path_factory, tmp_path):
    single = subprocess.run([sys.executable, str(CLIENT), str(SCHNELL), "--server", comfy_server.url, *TINY, *SEEDS,
                             "--out", str(tmp_path / "single")], capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = job_outputs(tmp_path / "single")
    assert sorted(expected) == [f"job-{i:04d}" for i in range(6)]
    assert all(len(files) == 1 for files in expected.values())
    assert len({files[0] for files in expected.values()}) == 6, "seeds differ"

    victim, survivor = start_servers(2, scratch_models, tmp_path_factory)
    try:
        command = [sys.executable, str(CLIENT), str(SCHNELL), *TINY, *SEEDS, "--out", str(tmp_path / "spread"),
                   "--per-server", "1", "--timeout", "300"]
        for url in (comfy_server.url, victim.url, survivor.url):
            command += ["--server", url]
        stderr_path = tmp_path / "client.err"
        with open(stderr_path, "w") as stderr:
            client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        deadline = time.monotonic() + 600
        # kill the victim while it runs one of the batch's prompts
        while not victim.get("/queue")["queue_running"]:
            assert client.poll() is None, stderr_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the batch did not start on the victim"
            time.sleep(0.2)
        victim.process.kill()
        stdout, _ = client.communicate(timeout=900)
        log = stderr_path.read_text()
        assert client.returncode == 0, log[-3000:]
    finally:
        victim.stop()
        survivor.stop()

    assert f"server {victim.url} dropped" in log and "re-queued" in log
    done_lines = [line for line in log.splitlines() if " done on " in line]
    assert sorted(int(line.split()[1]) for line in done_lines) == list(range(6)), "each job completed exactly once"
    assert not [p for p in (tmp_path / "spread").iterdir() if p.name.startswith(".")], "no partial downloads left"
    assert job_outputs(tmp_path / "spread") == expected
    assert len(stdout.split()) == 6, "each output path printed once"


@pytest.mark.server
def test_a_batch_runs_past_a_dead_first_server_and_keeps_an_earlier_batchs_results(comfy_server, tmp_path):
    """A batch whose first --server was down failed at /object_info with nothing run; a batch
    into an --out holding an earlier batch's job-NNNN folders deleted them."""
    out = tmp_path / "out"

    def batch(seed, *extra):
        return subprocess.run(
            [sys.executable, str(CLIENT), str(SCHNELL), *TINY, "--set", f"Sampler.seed={seed}", "--out", str(out),
             "--server", f"http://127.0.0.1:{free_port()}", "--server", comfy_server.url, *extra],
            check=False, capture_output=True, text=True, timeout=600)

    first = batch(1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "does not answer /object_info" in first.stderr
    earlier = job_outputs(out)
    assert list(earlier) == ["job-0000"] and len(earlier["job-0000"]) == 1

    queued_before = len(comfy_server.get("/history"))
    refused = batch(2)
    assert refused.returncode == client.EXIT_USAGE, refused.stderr[-3000:]
    assert "already holds results of an earlier batch (job-0000)" in refused.stderr and "--overwrite" in refused.stderr
    assert job_outputs(out) == earlier
    assert len(comfy_server.get("/history")) == queued_before, "refused before anything was queued"

    (out / "job-0000" / "stale.txt").write_text("from the earlier batch")
    replaced = batch(1, "--overwrite")  # the same prompt again: the server answers from its cache
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert job_outputs(out) == earlier, "the folder holds the new run's outputs only"
