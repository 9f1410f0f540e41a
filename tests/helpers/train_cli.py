"""Trainer runs for tests: small pretrain configs, the `ovenc_jax.main` command line, metrics, processes."""
import json
import os
import socket
import subprocess
import sys

from ovenc_jax.configs import pretrain

# The packaged config by absolute path: the command line works from any directory.
PRETRAIN_CONFIG = os.path.abspath(pretrain.__file__)


def overrides(total_steps=8, **extra):
  """Config keys -> values for a run of a few seconds on 8 host devices."""
  o = {"input.global_batch_size": 8, "input.tokens_per_row": 64, "input.max_segments": 2,
       "input.max_labels": 1, "loss.num_classes": 10, "loss.labels_per_step": 1,
       "optim.warmup_steps": 2, "total_steps": total_steps, "log_every": 1, "ckpt_every": 2,
       "eval_every": 0, "eval.tokens_per_row": 32, "eval.batch_size": 16, "eval.linear_probe": False}
  o.update(extra)
  return o


def set_keys(config, values) -> None:
  """Sets dotted `section.key` entries of `values` on config."""
  for key, value in values.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value


def make_config(train_dir, eval_dir="", config_arg="", **kw):
  """The tiny pretrain config on these shards with `overrides(**kw)` applied."""
  c = pretrain.get_config(f"variant=tiny,data={train_dir},eval_data={eval_dir}{config_arg}")
  set_keys(c, overrides(**kw))
  return c


def config_flag(config_arg):
  """`--config=` of the packaged pretrain config with these config args."""
  return f"--config={PRETRAIN_CONFIG}:{config_arg}"


def cli(workdir, train_dir, eval_dir="", extra=(), **kw):
  """The `python -m ovenc_jax.main` command line of make_config's run."""
  args = [sys.executable, "-m", "ovenc_jax.main", "--workdir", str(workdir),
          config_flag(f"variant=tiny,data={train_dir},eval_data={eval_dir}")]
  args += [f"--config.{k}={v}" for k, v in overrides(**kw).items()]
  return args + list(extra)


def printed_config(config_arg, *flags):
  """The config `python -m ovenc_jax.main --print_config` prints, parsed."""
  r = subprocess.run([sys.executable, "-m", "ovenc_jax.main", config_flag(config_arg), "--print_config", *flags],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout)


def losses(workdir):
  """{step: loss} from a workdir's metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        out[row["step"]] = row["loss"]
  return out


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir, train_dir, num_processes, env, **kw):
  """`num_processes` trainer processes of one run, coordinated over a local port."""
  port = free_port()
  return [subprocess.Popen(
      cli(workdir, train_dir, extra=[f"--coordinator_address=127.0.0.1:{port}",
                                     f"--num_processes={num_processes}", f"--process_id={i}"], **kw),
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]


def finish(procs, timeout):
  """Outputs of trainer processes that must all exit 0 within `timeout` seconds each."""
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:  # a hung trainer ignores SIGTERM (it only flags it): kill, so the suite goes on
      p.kill()
    raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs
