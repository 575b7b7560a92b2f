"""The CI profile of the soak test (tests/soak.py; `make soak` runs the long one): one real ComfyUI,
four API clients for 30 s submitting every kind of valid, invalid and interrupted prompt at least
once, then at random."""

import os

import pytest
from soak import kinds, run_soak, unreported_tracebacks

pytestmark = pytest.mark.server


def test_short_soak_of_the_real_server(tmp_path, models_dir):
    report = run_soak(models_dir.parent, tmp_path, seconds=float(os.environ.get("FLUXQ_SOAK_SECONDS", 30)), clients=4)
    print(report.text())
    assert not report.problems, report.text()
    assert {kind.name for kind in kinds()} <= {kind for kind, _ in report.outcomes}, report.text()
    assert report.interrupted_in["FluxQSampler"] and report.interrupted_in["FluxQTrainLoRA"], report.text()
    assert report.compared_recomputed >= 6 and report.rss_warm > 0, report.text()


def test_log_check_allows_interleaved_lines_and_flags_tracebacks_nobody_reported():
    """ComfyUI 0.33's threads log concurrently: another prompt's validation lines can fall between
    an "!!! Exception during processing !!!" report and its traceback (seen in the CI soak)."""
    report = "!!! Exception during processing !!! boom\n"
    traceback = "Traceback (most recent call last):\n  File x\n"
    interleaved = report + "[ERROR] - Custom validation failed for node\ninvalid prompt: {...}\n" + traceback
    assert unreported_tracebacks(interleaved) == []
    assert len(unreported_tracebacks("got prompt\n" + traceback)) == 1
    assert len(unreported_tracebacks(report + traceback + traceback)) == 1
    assert len(unreported_tracebacks(report + "line\n" * 30 + traceback)) == 1
