# Torch is installed first and on its own: a CPU wheel by default on machines that have one on disk,
# `make install TORCH=torch` for the normal (CUDA) build.
# `make install` installs what running sdcli needs; `make test` adds the test extra (the reference implementations,
# pytest, ruff) once. Stamp files in the venv remember what is installed: .installed (sdcli) and .test-installed.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
K_DIFFUSION ?= k-diffusion==0.1.1.post1
PYTEST_ARGS ?=

.PHONY: install test lint bench bench-quick clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	@touch $(VENV)/.installed
	@echo 'sdcli is installed; try: $(VENV)/bin/sdcli txt2img "a sunset over mountains"'

$(VENV)/.installed: pyproject.toml
	$(MAKE) install

# Order-only on .installed: a later `make install` does not make the test extra look stale.
$(VENV)/.test-installed: pyproject.toml | $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	# k-diffusion's declared dependencies pull torchvision and a CUDA torch; its sampling module needs none of them.
	$(PY) -m pip install -q --no-deps "$(K_DIFFUSION)"
	@touch $@

lint: $(VENV)/.test-installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# PYTEST_ARGS passes options on, e.g. `make test PYTEST_ARGS=--cpu-bf16=yes` (see README, "How correctness is tested").
test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The full measurements (long on a CPU): SD 1.5 networks and jobs, LoRA, few-step jobs, SDXL, the server.
bench: $(VENV)/.test-installed
	$(PY) bench/run.py
	$(PY) bench/profile_bf16.py
	$(PY) bench/lora.py
	$(PY) bench/fast.py
	$(PY) bench/sdxl.py
	$(PY) bench/serve_load.py

# Every benchmark small (256x256 or 512x512, one or two repeats): checks that they run, not how fast.
bench-quick: $(VENV)/.test-installed
	$(PY) bench/run.py --quick
	$(PY) bench/lora.py --quick
	$(PY) bench/fast.py --quick
	$(PY) bench/sdxl.py --quick
	$(PY) bench/serve_load.py --clients 1,4 --requests 8

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
