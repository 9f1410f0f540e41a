#!/usr/bin/env bash
# Single-host launch (CPU, one GPU box or one TPU VM): all local devices in one process.
#   launch/local.sh WORKDIR [ovenc_jax/configs/pretrain.py:variant=tiny] [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:?usage: launch/local.sh WORKDIR [CONFIG] [overrides...]}
config=${2:-ovenc_jax/configs/pretrain.py:variant=tiny}
shift $(( $# >= 2 ? 2 : 1 ))
exec .venv/bin/python -m ovenc_jax.main --config "$config" --workdir "$workdir" --distributed=off "$@"
