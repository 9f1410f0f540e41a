#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; jax.distributed.initialize() reads the TPU metadata.
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE gs://bucket/workdir CONFIG [--config.x=y ...]
# The repo must be checked out at ~/ovenc-jax on every worker (e.g. one `git clone` via --worker=all).
# Each worker creates or reuses its venv (launch/install_env.sh tpu: installs only when the lock
# changed); OVENC_PYTHON names a Python >= 3.11 on the workers (default python3). The exact command
# is printed first; --dry-run prints it and stops.
set -euo pipefail
dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
name=${1:?tpu name}; zone=${2:?zone}; workdir=${3:?workdir (gs:// path)}; config=${4:?config}
shift 4
case "$workdir" in
  gs://*) ;;
  *) echo "error: workdir $workdir: a pod's hosts share no disk; give a gs:// path" >&2; exit 2 ;;
esac
remote="cd ~/ovenc-jax && PYTHON=$(printf %q "${OVENC_PYTHON:-python3}") launch/install_env.sh tpu &&"
remote+=" .venv/bin/python -m ovenc_jax.main --config $(printf %q "$config") --workdir $(printf %q "$workdir")"
remote+=" --distributed=on"
for a in "$@"; do remote+=" $(printf %q "$a")"; done
cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command "$remote")
printf '%q ' "${cmd[@]}"; printf '\n'
if [ "$dry" = 1 ]; then exit 0; fi
exec "${cmd[@]}"
