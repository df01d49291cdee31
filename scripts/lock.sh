#!/usr/bin/env bash
# Regenerates constraints.txt, the exact versions CI installs: every package in .venv (kilnlm itself and the
# CPU build's "+cpu" suffix left out, so the same file serves CUDA machines). Run after changing a range in
# pyproject.toml and re-running scripts/setup.sh; commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Exact versions the test suite runs against (scripts/setup.sh installs them; regenerate: scripts/lock.sh)."
  .venv/bin/pip freeze --exclude-editable | grep -viE '^(kilnlm|pip|setuptools|wheel)[= @]' | sed -E 's/\+cpu$//'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
