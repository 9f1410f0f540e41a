"""The pod and cluster launchers in --dry-run mode: the exact commands, the Python check, the lock."""
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash(*args, **env):
  # VENV always points into a temp folder: these runs must never touch the checkout's venv.
  return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                        env=dict(os.environ, **env))


def test_tpu_pod_dry_run_prints_the_exact_command():
  r = _bash("launch/tpu_pod.sh", "--dry-run", "pod1", "us-central2-b", "gs://bkt/run",
            "ovenc_jax/configs/pretrain.py:variant=base", "--config.input.sources=[{'path': 'gs://b/d'}]",
            OVENC_PYTHON="/opt/py 3.11/bin/python")
  assert r.returncode == 0, r.stderr
  cmd = shlex.split(r.stdout.strip().splitlines()[-1])
  assert cmd[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=us-central2-b", "--worker=all"]
  assert cmd[8] == "--command" and len(cmd) == 10
  setup, train = cmd[9].split(" && ")[1:]
  assert shlex.split(setup) == ["PYTHON=/opt/py 3.11/bin/python", "launch/install_env.sh", "tpu"]
  assert shlex.split(train) == [".venv/bin/python", "-m", "ovenc_jax.main", "--config",
                                "ovenc_jax/configs/pretrain.py:variant=base", "--workdir", "gs://bkt/run",
                                "--distributed=on", "--config.input.sources=[{'path': 'gs://b/d'}]"]


def test_tpu_pod_refuses_a_local_workdir():
  r = _bash("launch/tpu_pod.sh", "--dry-run", "pod1", "zone", "/tmp/run", "cfg.py")
  assert r.returncode == 2 and "workdir /tmp/run" in r.stderr and "gs://" in r.stderr


def test_install_env_checks_python_first(tmp_path):
  old = tmp_path / "python3.10"
  # A stand-in for a TPU VM's python3: fails the version test, reports 3.10.12.
  old.write_text('#!/bin/sh\ncase "$2" in *exit*) exit 1;; *) echo 3.10.12;; esac\n')
  old.chmod(0o755)
  r = _bash("launch/install_env.sh", "tpu", PYTHON=str(old), VENV=str(tmp_path / "venv"))
  assert r.returncode == 3
  assert f"PYTHON={old} is Python 3.10.12" in r.stderr and ">= 3.11" in r.stderr
  assert "uv python install 3.11" in r.stderr and "deadsnakes" in r.stderr
  assert not (tmp_path / "venv").exists()


def test_install_env_installs_only_when_the_lock_changed(tmp_path):
  venv = tmp_path / "venv"
  env = dict(PYTHON=sys.executable, VENV=str(venv))
  r = _bash("launch/install_env.sh", "--dry-run", "gpu", **env)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  lock = lines[0].split("lock ")[1].rstrip(")")
  assert [shlex.split(x) for x in lines[1:]] == [
      ["+", sys.executable, "-m", "venv", str(venv)],
      ["+", f"{venv}/bin/pip", "install", "-q", "-r", "requirements.txt"],
      ["+", f"{venv}/bin/pip", "install", "-q", "--no-build-isolation", "-e", ".[gpu]"]]
  assert not venv.exists()  # a dry run creates nothing
  # A venv stamped with this lock is reused; another extra (another lock) installs again.
  (venv / "bin").mkdir(parents=True)
  os.symlink(sys.executable, venv / "bin" / "python")
  (venv / ".ovenc-lock").write_text(lock + "\n")
  r = _bash("launch/install_env.sh", "--dry-run", "gpu", **env)
  assert r.stdout.strip() == f"venv {venv} is up to date (lock {lock})"
  r = _bash("launch/install_env.sh", "--dry-run", "tpu", **env)
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith("installing into") and lock not in lines[0] and shlex.split(lines[-1])[-1] == ".[tpu]"


def test_slurm_dry_run_installs_once_then_prints_srun(tmp_path):
  venv = str(tmp_path / "venv")
  r = _bash("launch/slurm_gpu.sbatch", "--dry-run", "gs://bkt/run", "cfg.py:variant=tiny", "--config.x=a b",
            PYTHON=sys.executable, VENV=venv)
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith("installing into") and shlex.split(lines[3])[-2:] == ["-e", ".[gpu]"]
  assert shlex.split(lines[-1]) == ["srun", "--kill-on-bad-exit=1", f"{venv}/bin/python", "-m", "ovenc_jax.main",
                                    "--config", "cfg.py:variant=tiny", "--workdir", "gs://bkt/run",
                                    "--distributed=on", "--config.model.attention=cudnn",
                                    "--config.model.dtype=bfloat16", "--config.x=a b"]


def _pins(path):
  with open(os.path.join(ROOT, path)) as f:
    return dict(line.split("==", 1) for line in (x.split("#")[0].strip() for x in f) if "==" in line)


def test_dataflow_requirements_cover_the_job_and_match_the_lock():
  import ast
  import glob
  import re
  from importlib import metadata
  lock, workers = _pins("requirements.txt"), _pins("launch/dataflow_requirements.txt")
  assert {k: lock.get(k) for k in workers} == workers  # the same pins as the lock
  files = (glob.glob(os.path.join(ROOT, "ovenc_format", "*.py")) + glob.glob(os.path.join(ROOT, "data_prep", "codec", "*.py"))
           + [os.path.join(ROOT, "data_prep", n) for n in ("codec_patchify.py", "patchify_output.py")])
  modules = set()
  for path in files:
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        modules |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        modules.add(node.module.split(".")[0])
  dists = metadata.packages_distributions()
  norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
  # Beam comes with the worker image; dask/distributed only for --runner=dask (not on Dataflow);
  # `google` (google.auth, in ovenc_format/paths.py) is a namespace that gcsfs's dependencies fill.
  third_party = modules - set(sys.stdlib_module_names) - {"google", "ovenc_format", "data_prep"}
  needed = {norm(d) for m in third_party for d in dists.get(m, [])} - {"apache-beam", "dask", "distributed"}
  listed = {norm(k) for k in workers}
  assert {"av", "numba", "array-record", "gcsfs"} <= needed <= listed, sorted(needed - listed)
