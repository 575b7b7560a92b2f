# One command for the main job, one for the tests; both set up what they need first.
#   make demo   start headless ComfyUI with the pack, run a bundled workflow, print where the PNGs are
#   make test   the whole test suite (unit, real-ComfyUI integration, headless-browser)
# HARNESS_DIR (default .harness) and COMFYUI_PATH (your own ComfyUI) are honoured.

HARNESS_DIR ?= $(CURDIR)/.harness
PY := $(HARNESS_DIR)/venv/bin/python
PYTEST := $(PY) -m pytest --rootdir tests -c tests/pytest.ini

.PHONY: setup demo test test-unit bench
export HARNESS_DIR

setup:
	bash scripts/setup_harness.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PYTEST) tests

test-unit: setup
	$(PYTEST) tests/unit

bench: setup
	$(PY) bench/bench_flux_gguf.py --size tiny --res 256 --warmup 1 --steps 5
