"""Training entry point: `python -m ovenc_jax.main --config PATH/pretrain.py:variant=tiny --workdir DIR`."""
import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

from ovenc_jax import cli_errors

PROG = "ovenc-train"

# The packaged pretraining config, so an installed copy trains without knowing where its files live.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "pretrain.py")
_CONFIG = None  # the --config flag, defined by cli(): defining it parses the command line's overrides


def _define_config_flag() -> None:
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "a config file and its args, e.g. ovenc_jax/configs/pretrain.py:variant=base "
      "(default: the packaged pretrain.py, variant tiny)", lock_config=True)


_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard events go here")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: initialise jax.distributed when a coordinator flag, SLURM (>1 task) or a TPU pod is detected")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (GPU clusters, tests)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "total processes (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the config after all overrides as JSON and exit")
cli_errors.define_verbose_flag()
flags.declare_key_flag("verbose")


def _want_distributed() -> bool:
  if _DISTRIBUTED.value != "auto":
    return _DISTRIBUTED.value == "on"
  if _COORDINATOR.value:
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed() -> None:
  """jax.distributed.initialize from explicit flags, else auto-detected (SLURM env, TPU metadata)."""
  import jax
  if not _want_distributed():
    return
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  else:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _PRINT_CONFIG.value:
    print(_CONFIG.value.to_json(sort_keys=True), flush=True)
    return
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
  logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. every backend it could not load
  initialize_distributed()
  # Before any compile: a gs:// workdir without credentials or bucket, or a read-only folder, is one
  # line naming the path rather than a failure at the first checkpoint.
  from ovenc_format import paths
  paths.check_writable(_WORKDIR.value, "--workdir")
  import jax
  from ovenc_jax.train import trainer as train  # after distributed init: nothing may touch devices before it
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  trainer = train.Trainer(_CONFIG.value, _WORKDIR.value)
  logging.info("mesh %s", dict(trainer.mesh.shape))
  summary = trainer.run()
  if jax.process_index() == 0:
    print("SUMMARY " + json.dumps(summary, default=float), flush=True)


def cli():
  """The `ovenc-train` command: user errors as one line `ovenc-train: error: ...` (exit 2), --verbose for
  the traceback."""
  cli_errors.run(main, PROG, define_flags=_define_config_flag)


if __name__ == "__main__":
  cli()
