#!/usr/bin/env bash
# Create .venv and install segens with its test extras, only when missing or when pyproject.toml changed.
# Idempotent: a second run costs a hash. The first install is large (torch, about 6 GB, 2-3 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp=".venv/.segens-install-stamp"
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
    exit 0
fi
echo "segens: installing into .venv (first time: about 3 minutes and 6 GB for torch) ..." >&2
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "$wanted" > "$stamp"
echo "segens: .venv ready" >&2
