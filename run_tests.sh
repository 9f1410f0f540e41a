#!/usr/bin/env bash
# Installs the pinned stack and this package into .venv, then runs the tests on CPU.
#   ./run_tests.sh            every test (what CI runs)
#   ./run_tests.sh --quick    everything not marked slow
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh
args=()
for a in "$@"; do
  if [ "$a" = "--quick" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
exec .venv/bin/python -m pytest -q tests ${args[@]+"${args[@]}"}
