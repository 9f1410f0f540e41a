#!/usr/bin/env bash
# Installs the pinned stack into .venv (once) and runs the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if ! cmp -s requirements.txt .venv/.requirements.installed; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  cp requirements.txt .venv/.requirements.installed
fi
exec .venv/bin/python -m pytest -q tests "$@"
