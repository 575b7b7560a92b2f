"""The GPU benchmark loads the pack's glue without ComfyUI's server modules (the lent GPU machine has
no `av`, which ComfyUI's `nodes` and `comfy_api` import: bench/README.md's recipe relies on it), and
builds each family member at its released size from the registry."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import COMFY_DIR, REPO_ROOT

CHECK = """
import json, sys, types
sys.path.insert(0, {bench!r})
import bench_flux_gguf as bench
glue, cuda = bench.setup_comfy(types.SimpleNamespace(device="cpu", comfyui=bench.Path({comfy!r})))
glue.load_flux_gguf, glue.flux2_sigmas, glue.patch_flow_shift  # the names the bench and sampling use
absent = sorted(m for m in ("av", "comfy_api", "nodes", "server") if m in sys.modules)
import torch, comfy.ldm.flux.model, comfy.ops
from make_tiny_models import model_params
sizes = {{}}
for arch in bench.ARCHS:  # the full-size architectures the bench builds, on the meta device
    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init,
                                          **model_params(comfy.ldm.flux.model.FluxParams, bench.arch_params(arch, "full")))
    sizes[arch] = sum(t.numel() for t in model.state_dict().values()) / 1e9
print(json.dumps([absent, sizes]))
"""
# Published parameter counts (billions): FLUX.1 [dev] 12, FLUX.2 [dev] 32, klein 4B and 9B.
PUBLISHED = {"flux1-dev": 11.9, "flux2-dev": 32.2, "flux2-klein-4b": 3.9, "flux2-klein-9b": 9.1}


def test_bench_loads_without_comfyuis_server_modules_and_builds_the_released_sizes(models_dir):  # models_dir: harness present
    script = CHECK.format(bench=str(REPO_ROOT / "bench"), comfy=str(COMFY_DIR))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    absent, sizes = json.loads(done.stdout.strip().splitlines()[-1])
    assert absent == []
    assert sizes.keys() == PUBLISHED.keys()
    for arch, billions in PUBLISHED.items():
        assert abs(sizes[arch] - billions) < 0.05, (arch, sizes[arch])
