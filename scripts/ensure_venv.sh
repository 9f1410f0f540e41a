#!/usr/bin/env bash
# Creates .venv with the pinned stack (requirements.txt) and this package installed editable; does
# nothing when neither requirements.txt nor pyproject.toml changed since the last install.
# Usage (from the checkout root): scripts/ensure_venv.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
stamp=.venv/.requirements.installed
if ! cat requirements.txt pyproject.toml | cmp -s - "$stamp"; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  # setuptools warns about editable installs on every run; show its output only when it fails.
  if ! log=$(.venv/bin/pip install -q --no-deps --no-build-isolation -e . 2>&1); then
    echo "$log" >&2
    exit 1
  fi
  cat requirements.txt pyproject.toml > "$stamp"
fi
