#!/usr/bin/env bash
# Installs the pinned stack and this package (editable) into .venv, then runs the tests on CPU.
#   ./run_tests.sh            every test (what CI runs)
#   ./run_tests.sh --quick    everything not marked slow
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
stamp=.venv/.requirements.installed
if ! { cat requirements.txt pyproject.toml | cmp -s - "$stamp"; }; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps --no-build-isolation -e .
  cat requirements.txt pyproject.toml > "$stamp"
fi
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
exec .venv/bin/python -m pytest -q tests "${args[@]}"
