# The two commands of the README: `make demo` and `make test`. Each sets itself up from a fresh clone.
# CUDA users who already have torch: make install VENV_FLAGS=--system-site-packages CONSTRAINTS=
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints.txt
VENV_FLAGS ?=
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo demo-quick clean gpu-wheels

$(VENV)/.installed: setup.cfg constraints.txt
	python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test,lora]'
	touch $@

install: $(VENV)/.installed

# Two pytest workers (pytest-xdist), a test file each at a time: most of the slow tests wait on one-threaded imports
# in subprocesses, so two cores finish the suite sooner (docs/log/scale_out.md, test durations).
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not integration and not multiprocess and not experiments"

demo: install
	$(PY) -m apt demo

demo-quick: install
	$(PY) -m apt demo --quick --out runs/demo-quick

clean:
	rm -rf runs/demo-quick .pytest_cache

# Wheels for an offline GPU machine (no package registry there): the optional attention kernels and the
# pure-Python packages the GPU sweep needs beyond torch. eval/gpu_sweep.sh installs them from .whl/ (gitignored).
GPU_WHEELS := fa3-fwd==0.0.3 sageattention==1.0.6 diffusers==0.42.1 omegaconf==2.4.0 einops==0.8.2
gpu-wheels:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .whl $(GPU_WHEELS)
	du -sh .whl
