"""The compare view in a real browser: headless Debian Chromium driven by playwright-core (npm)
against the test ComfyUI server. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
WORKFLOW = REPO_ROOT / "workflows" / "flux_lora_compare_grid.json"
MODEL_MAP = REPO_ROOT / "scripts" / "tiny_model_map.json"
ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def node_script_ready():
    missing = [what for what, ok in (("chromium", Path(CHROMIUM).exists()), ("node", shutil.which("node")),
                                     ("npm", shutil.which("npm"))) if not ok]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install -y chromium nodejs npm); CI installs them")
    if not (HERE / "node_modules" / "playwright-core").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=HERE, check=True, timeout=300)


@pytest.mark.browser
def test_compare_view_in_headless_chromium(node_script_ready, comfy_server):
    assert WORKFLOW.exists(), f"the bundled workflow {WORKFLOW} is missing"
    result = subprocess.run(
        ["node", "compare_view.mjs", comfy_server.url, str(WORKFLOW), str(MODEL_MAP), str(ARTIFACTS)],
        cwd=HERE, capture_output=True, text=True, timeout=900,
        env={**os.environ, "CHROMIUM_PATH": CHROMIUM},
    )
    print(result.stdout)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n--- ComfyUI log ---\n{comfy_server.log_tail()}"
    assert (ARTIFACTS / "compare_view_classic.png").exists()
