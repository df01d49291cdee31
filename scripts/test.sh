#!/usr/bin/env bash
# The test command: set up (idempotent), lint, run the whole suite (slow multi-process tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# .venv/bin/pytest (not `python -m pytest`): the checkout root stays off sys.path, so every test imports kiln.*
# through the installed package mapping, as a user would
.venv/bin/pytest -q --durations=15 "$@"  # the slowest tests listed: CI must stay under 25 minutes
