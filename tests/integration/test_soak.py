"""The CI profile of the soak test (tests/soak.py; `make soak` runs the long one): one real ComfyUI,
four API clients for 30 s submitting every kind of valid, invalid and interrupted prompt at least
once, then at random."""

import os

import pytest
from soak import kinds, run_soak

pytestmark = pytest.mark.server


def test_short_soak_of_the_real_server(tmp_path, models_dir):
    report = run_soak(models_dir.parent, tmp_path, seconds=float(os.environ.get("FLUXQ_SOAK_SECONDS", 30)), clients=4)
    print(report.text())
    assert not report.problems, report.text()
    assert {kind.name for kind in kinds()} <= {kind for kind, _ in report.outcomes}, report.text()
    assert report.interrupted_in["FluxQSampler"] and report.interrupted_in["FluxQTrainLoRA"], report.text()
    assert report.compared_recomputed >= 6 and report.rss_warm > 0, report.text()
