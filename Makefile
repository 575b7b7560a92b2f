# One command for the main job, one for the tests; both set up what they need first.
#   make demo   start headless ComfyUI with the pack, run a bundled workflow, print where the PNGs are
#   make test   the whole test suite (unit, real-ComfyUI integration, headless-browser)
#   make fuzz   the parser fuzz campaign (FUZZ_EXAMPLES per target, default 20000; see docs/RELIABILITY.md)
#   make soak   the server soak test (SOAK_SECONDS, default 600; SOAK_CLIENTS, default 4; COMFYUI_VERSION=0.33.0
#               for the other ComfyUI; see docs/RELIABILITY.md)
# `make test` runs the suite against ComfyUI 0.3.75 and 0.33.0 (scripts/run_tests.sh), each in its
# own harness; COMFYUI_VERSIONS="0.33.0" picks one, COMFYUI_PATH (your own ComfyUI) runs once against
# it. Demo and bench use the default harness (.harness, ComfyUI 0.3.75) or COMFYUI_PATH.

HARNESS_DIR ?= $(CURDIR)/.harness
PY := $(HARNESS_DIR)/venv/bin/python
PYTEST := $(PY) -m pytest --rootdir tests -c tests/pytest.ini

.PHONY: setup demo test test-unit bench fuzz soak

setup:
	bash scripts/setup_harness.sh

demo: setup
	$(PY) scripts/demo.py

test:
	bash scripts/run_tests.sh tests

test-unit:
	bash scripts/run_tests.sh tests/unit

bench: setup
	$(PY) bench/bench_flux_gguf.py --size tiny --res 256 --warmup 1 --steps 2

FUZZ_EXAMPLES ?= 20000
fuzz: setup
	FLUXQ_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTEST) tests/unit/test_fuzz_gguf.py tests/unit/test_fuzz_lora.py \
		tests/unit/test_fuzz_dataset.py tests/unit/test_fuzz_workflow_grid.py tests/unit/test_fuzz_llm_gguf.py \
		tests/unit/test_fuzz_model_weights.py tests/unit/test_fuzz_block_weights.py -p no:cacheprovider -q \
		--hypothesis-show-statistics

SOAK_SECONDS ?= 600
SOAK_CLIENTS ?= 4
soak:
	@log="$$(mktemp)"; bash scripts/setup_harness.sh >"$$log" 2>&1 || { cat "$$log"; rm -f "$$log"; exit 1; }; \
	comfy="$$(sed -n 's/^COMFYUI=//p' "$$log" | tail -1)"; python="$$(sed -n 's/^PYTHON=//p' "$$log" | tail -1)"; \
	rm -f "$$log"; COMFYUI_PATH="$$comfy" "$$python" tests/soak.py --seconds $(SOAK_SECONDS) --clients $(SOAK_CLIENTS)
