# The two commands: `make test` and `make bench`. Each creates .venv on first
# use, installs torch (TORCH_SPEC) and the package, and is quick when nothing
# changed: the stamps below re-run a step only when its inputs change.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

TEST_DEPS := ninja pybind11 "setuptools>=68.1" wheel "pytest>=8.2" hypothesis pytorch-crf expecttest triton numpy transformers tqdm
BENCH_DEPS := tqdm matplotlib pytorch-crf torch-struct
SOURCES := setup.py fastnlp/_source_hash.py $(shell find csrc -type f)

.PHONY: test bench build clean FORCE

# Then the emulated CUDA kernels' tests once more, in a process of their own,
# under AddressSanitizer and UBSan (see python_tests/run_emulated_sanitized.py).
test: $(VENV)/.built
	$(PY) -m pytest python_tests
	$(PY) python_tests/run_emulated_sanitized.py

bench: $(VENV)/.built $(VENV)/.bench-deps
	$(PY) -m fastnlp.bench --device cpu --quick

build: $(VENV)/.built

$(PY):
	$(PYTHON) -m venv $(VENV)

# Rewritten only when TORCH_SPEC changes, so a new spec reinstalls.
$(VENV)/.torch-spec: FORCE | $(PY)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(VENV)/.deps: $(VENV)/.torch-spec pyproject.toml | $(PY)
	$(PIP) install '$(TORCH_SPEC)' $(TEST_DEPS)
	@touch $@

$(VENV)/.bench-deps: $(VENV)/.deps
	$(PIP) install $(BENCH_DEPS)
	@touch $@

# A development install: the extension is built in place against the torch
# installed above (no build isolation, which would fetch a second torch) and
# incrementally (ninja, objects kept in build/); a .pth file puts this
# checkout on the venv's path, which is all an editable install does. (pip's
# editable install would compile everything a second time in a temp dir.)
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c 'import os, sysconfig; open(os.path.join(sysconfig.get_paths()["purelib"], "fastnlp-dev.pth"), "w").write(os.getcwd() + "\n")'
	@touch $@

clean:
	rm -rf build fastnlp/_C*.so *.egg-info
