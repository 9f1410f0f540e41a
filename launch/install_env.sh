#!/usr/bin/env bash
# Creates or reuses a venv with the pinned stack (requirements.txt) and this package with one extra.
# It installs only when the lock changed: a hash of requirements.txt, pyproject.toml, the extra and
# the Python version, kept in the venv. Python >= 3.11 is checked first.
#   launch/install_env.sh [--dry-run] EXTRA        EXTRA: tpu, gpu or none
#   environment: PYTHON (default python3), VENV (default .venv in the checkout)
set -euo pipefail
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
extra=${1:?usage: launch/install_env.sh [--dry-run] tpu|gpu|none}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
venv=${VENV:-.venv}
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  have=$("$py" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo "not found")
  cat >&2 <<MSG
error: PYTHON=$py is Python $have; the pinned stack (numpy 2.4, jax 0.10) needs Python >= 3.11.
  TPU VM images ship Python 3.10. Get 3.11+ on every host, then pass it as PYTHON:
    uv:         curl -LsSf https://astral.sh/uv/install.sh | sh && ~/.local/bin/uv python install 3.11
                PYTHON=\$(~/.local/bin/uv python find 3.11)
    deadsnakes: sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11-venv
                PYTHON=python3.11
MSG
  exit 3
fi
lock=$( (cat requirements.txt pyproject.toml; echo "extra=$extra"; "$py" -c 'import sys; print(sys.version)') |
  sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.ovenc-lock" 2>/dev/null)" = "$lock" ]; then
  echo "venv $venv is up to date (lock $lock)"
  exit 0
fi
spec=.
if [ "$extra" != none ]; then spec=".[$extra]"; fi
echo "installing into $venv (lock $lock)"
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$dry" = 0 ]; then "$@"; fi
}
run "$py" -m venv "$venv"
run "$venv/bin/pip" install -q -r requirements.txt
# setuptools comes pinned from requirements.txt: no isolated build environment to download.
run "$venv/bin/pip" install -q --no-build-isolation -e "$spec"
if [ "$dry" = 0 ]; then echo "$lock" > "$venv/.ovenc-lock"; fi
