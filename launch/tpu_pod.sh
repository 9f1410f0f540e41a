#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; jax.distributed.initialize() reads the TPU metadata.
#   launch/tpu_pod.sh TPU_NAME ZONE gs://bucket/workdir ovenc_jax/configs/pretrain.py:variant=base [--config.x=y ...]
# The repo must be checked out at ~/ovenc-jax on every worker (e.g. one `git clone` via --worker=all).
set -euo pipefail
name=${1:?tpu name}; zone=${2:?zone}; workdir=${3:?workdir (gs:// path)}; config=${4:?config}
shift 4
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command "
  cd ~/ovenc-jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' &&
  .venv/bin/python -m ovenc_jax.main --config '$config' --workdir '$workdir' --distributed=on $*"
