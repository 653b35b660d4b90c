# Torch is installed first and on its own: a CPU wheel by default on machines that have one on disk,
# `make install TORCH=torch` for the normal (CUDA) build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
K_DIFFUSION ?= k-diffusion==0.1.1.post1

.PHONY: install test lint bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# k-diffusion's declared dependencies pull torchvision and a CUDA torch; its sampling module needs none of them.
	$(PY) -m pip install -q --no-deps "$(K_DIFFUSION)"
	@touch $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(MAKE) install

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/run.py
	$(PY) bench/lora.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
