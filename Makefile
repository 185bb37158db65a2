# Two commands: `make demo` and `make test`. Both create .venv on their own.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUN ?= runs/demo
PYTEST_ARGS ?=
UV_VERSION := 0.13.9
# compileall skips these (see $(VENV)/.installed); HF_TYPES's architectures, their processors and the auto classes stay
PYC_SKIP := /tests?/|/transformers/models/(?!(auto|bit|clip|dinov2|encoder_decoder|siglip|vit)/|__init__\.py)
# A module without bytecode is compiled by the first process that imports it, and cached for the next ones, even
# where the shell sets PYTHONDONTWRITEBYTECODE (then every Ray worker would compile it again)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup test test-fast demo zoo zoo-diverse data clean bundle gpu-data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# uv downloads and unpacks in parallel, from the sources pip is configured with (cluster/fast_install.py): 23 s
	@# against pip's 63 s on 2 cores from empty caches. If uv cannot be had or fails, pip installs as before.
	$(PY) -m pip install -q uv==$(UV_VERSION) && $(PY) cluster/fast_install.py -e '.[test]' \
	  || { $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q --no-compile -e '.[test]'; }
	@# bytecode on both cores (pip compiles one file at a time); a few packages ship files that are not meant to compile.
	@# Not the packages' own test folders, nor the Hugging Face model code of architectures coopt never loads (families.py
	@# HF_TYPES): 29 % of the files, 47 s against 60 s. Whatever is imported later gets its bytecode written then.
	$(PY) -m compileall -qq -j 0 -x '$(PYC_SKIP)' $(VENV)/lib > /dev/null || true
	touch $@

data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Fashion-MNIST (dataset-fashion-mnist)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist' or set data.path"; exit 1; \
	  fi; \
	fi

setup: $(VENV)/.installed data

# Every test, the multi-node, job and kill tests and docs/cluster.md's cluster sequence included (what CI runs;
# ~11 min on an idle 2-core host from a fresh clone, setup included, up to ~20 on a slower one: README, Tests).
test: setup
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# Without the tests marked slow (the cluster sequence, multi-node, job and kill tests, the longer pipeline runs, the
# zoo's parallel build, the student-learns and labeled-distillation benchmark checks): 2.5-4 min on a 2-core host.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

zoo: setup
	$(VENV)/bin/coopt zoo build --out zoo

# A second offline zoo whose teachers know different things (CLIP on classes 0-4, label-free SimCLR, supervised
# on classes 5-9); benchmarks/zoo_diversity.py checks that they add up.
zoo-diverse: setup
	$(VENV)/bin/coopt zoo build --specs diverse --out zoo-diverse

demo: setup
	$(VENV)/bin/coopt run --config configs/fashion-mnist.yaml --out $(RUN)

# Offline install bundle for GPU nodes that already have torch: everything else, for Python $(PY_TAG), in one archive
# (Ray trimmed; packages the node already has left out when large, see cluster/bundle.py). Install it there with
# `bash cluster/install_offline.sh $(BUNDLE)`. BUNDLE_HAVE= (empty) ships them all. BUNDLE_DATA=$(dir $(FMNIST)) also
# carries Fashion-MNIST's IDX files (+26 MB: over the 60 MB goal with the default package set).
PY_TAG ?= 3.12
BUNDLE ?= dist/coopt-bundle-py$(subst .,,$(PY_TAG)).tar.xz
BUNDLE_HAVE ?= cluster/bundle-have-h200.txt
BUNDLE_DATA ?=
bundle:
	$(PYTHON) cluster/bundle.py --python-version $(PY_TAG) --out $(BUNDLE) \
	  $(if $(BUNDLE_HAVE),--have $(BUNDLE_HAVE)) $(if $(BUNDLE_DATA),--data $(BUNDLE_DATA))

# Only the Fashion-MNIST images benchmarks/gpu_check.py reads (train[0:50000], t10k[0:2000]; 19.6 MB), for a GPU
# machine without the dataset; the bundle and this archive fit one 64 MiB device call together (README, GPU nodes).
GPU_DATA ?= dist/fashion-mnist-gpu-check.tar.xz
gpu-data:
	$(PYTHON) cluster/bundle.py --data-only $(GPU_DATA) --data $(dir $(FMNIST)) --data-train 50000 --data-test 2000

clean:
	rm -rf $(VENV) runs
