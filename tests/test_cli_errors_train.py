"""The training CLIs on a workdir of another model and on bad input: one error line, exit 2, nothing written."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import digit_shards
from tests.helpers.train_cli import PRETRAIN_CONFIG, cli

# tiny is width 128 with 4 heads; 256 keeps a head size the 3D RoPE split accepts.
WIDER = "--config.model.width=256"


def _hashes(folder) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _run(args, timeout=300):
  return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _one_error(r, prog="ovenc-train") -> str:
  """The single `PROG: error:` line of a run that failed as a user error (exit 2, no traceback)."""
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  lines = [line for line in r.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
  assert len(lines) == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(train shards, a tiny workdir trained 2 steps through the CLI, its file hashes)."""
  root = tmp_path_factory.mktemp("cli_errors")
  shards = digit_shards.write_digit_shards(str(root / "train"), 0, 100, num_shards=2)
  work = str(root / "tiny")
  r = _run(cli(work, shards, total_steps=2))
  assert r.returncode == 0, r.stderr[-3000:]
  return shards, work, _hashes(work)


@pytest.mark.slow
def test_restart_with_a_wider_model_names_the_parameter_and_changes_nothing(trained):
  shards, work, before = trained
  assert "config.json" in before and any(k.startswith("checkpoints/") for k in before)
  r = _run(cli(work, shards, total_steps=4, extra=[WIDER]))
  line = _one_error(r)
  assert work in line and "params/encoder/" in line, line
  # The first differing parameter, with the checkpoint's shape and the model's.
  assert "[4, 32] in the checkpoint and [4, 64] in the model" in line, line
  assert _hashes(work) == before
  with open(os.path.join(work, "config.json")) as f:
    assert json.load(f)["model"]["width"] == 128


@pytest.mark.slow
def test_restart_with_another_rope_names_the_config_key(trained):
  """Equal shapes, another function: the stored config.json's model section is compared too."""
  shards, work, before = trained
  line = _one_error(_run(cli(work, shards, total_steps=4, extra=["--config.model.rope_theta=500.0"])))
  assert "config.model.rope_theta=500.0" in line and "rope_theta=10000.0" in line and work in line, line
  assert _hashes(work) == before


@pytest.mark.slow
def test_init_from_a_workdir_of_another_size_fails_before_writing(trained, tmp_path):
  shards, work, before = trained
  new = tmp_path / "finetune"
  r = _run(cli(new, shards, total_steps=4, extra=[WIDER, f"--config.init_from={work}"]))
  line = _one_error(r)
  assert f"config.init_from={work}" in line and "[4, 32] in the checkpoint and [4, 64] in the model" in line, line
  assert not new.exists()
  assert _hashes(work) == before


@pytest.mark.slow
def test_resume_with_the_same_model_still_runs_and_rewrites_config(trained, tmp_path):
  shards, work, _ = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(work, copy)
  r = _run(cli(copy, shards, total_steps=3))
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads([line for line in r.stdout.splitlines() if line.startswith("SUMMARY ")][-1][8:])
  assert (summary["start_step"], summary["final_step"]) == (2, 3)
  with open(os.path.join(copy, "config.json")) as f:
    assert json.load(f)["total_steps"] == 3


@pytest.mark.slow
def test_bad_config_value_is_one_line_and_verbose_shows_the_traceback(trained, tmp_path):
  shards, _, _ = trained
  new = tmp_path / "run"
  r = _run(cli(new, shards, total_steps=0))
  assert _one_error(r) == "ovenc-train: error: config.total_steps=0 must be a positive integer"
  r = _run(cli(new, shards, total_steps=0, extra=["--verbose"]))
  assert r.returncode == 2
  assert "Traceback (most recent call last)" in r.stderr and "validate_config" in r.stderr, r.stderr[-3000:]
  assert r.stderr.rstrip().splitlines()[-1] == "ovenc-train: error: config.total_steps=0 must be a positive integer"
  assert not new.exists()


@pytest.mark.slow
def test_missing_data_folder_is_one_line_naming_it(tmp_path):
  missing = str(tmp_path / "no_shards")
  r = _run(cli(tmp_path / "run", missing, total_steps=2))
  line = _one_error(r)
  assert missing in line and "input.sources" in line, line
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_params_only_import_is_not_resumed_and_bad_safetensors_leave_no_workdir(trained, tmp_path):
  from ovenc_jax.interop import export_torch
  shards, work, _ = trained
  pt = str(tmp_path / "pt")
  export_torch.export_workdir(work, pt)
  # A good import into an existing empty folder: checkpoint and config.json moved in, no staging left.
  target = tmp_path / "imported"
  target.mkdir()
  r = _run([sys.executable, "-m", "ovenc_jax.interop.import_torch", "--input", pt, "--workdir", str(target)])
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(target)) == ["checkpoints", "config.json"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["imported", "pt"]
  # Resuming the params-only checkpoint as a run is refused, pointing at init_from.
  before = _hashes(target)
  line = _one_error(_run(cli(target, shards, total_steps=2)))
  assert "parameters only" in line and f"--config.init_from={target}" in line, line
  assert _hashes(target) == before
  # Safetensors that do not fit the config.json beside them: the parameter and both shapes, no workdir.
  with open(os.path.join(pt, "config.json")) as f:
    hf = json.load(f)
  with open(os.path.join(pt, "config.json"), "w") as f:
    json.dump(dict(hf, intermediate_size=256), f)
  out = tmp_path / "bad_import"
  r = _run([sys.executable, "-m", "ovenc_jax.interop.import_torch", "--input", pt, "--workdir", str(out)])
  assert r.returncode != 0
  assert "model.safetensors" in r.stderr and "has shape (512, 128), expected (256, 128)" in r.stderr, r.stderr
  assert not out.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["imported", "pt"]


@pytest.mark.slow
def test_aot_compile_user_error_is_one_line():
  r = _run([sys.executable, "-m", "ovenc_jax.aot.compile", f"--config={PRETRAIN_CONFIG}:variant=tiny",
            "--topology=v9z-3"], timeout=300)
  line = _one_error(r, prog="ovenc-aot")
  assert "--topology='v9z-3'" in line, line


@pytest.mark.slow
def test_import_failing_after_the_checkpoint_leaves_the_workdir_as_it_was(trained, tmp_path, monkeypatch):
  from ovenc_jax.interop import export_torch, import_torch
  _, work, _ = trained
  pt = str(tmp_path / "pt")
  export_torch.export_workdir(work, pt)
  target = tmp_path / "into"
  target.mkdir()
  (target / "notes.txt").write_text("kept")

  def disk_full(*_):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(import_torch.atomic_io, "save_json", disk_full)  # after the checkpoint is written
  with pytest.raises(OSError, match="No space left"):
    import_torch.import_dir(pt, str(target))
  assert sorted(os.listdir(target)) == ["notes.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["into", "pt"]  # no staging folder left
  monkeypatch.undo()
  import_torch.import_dir(pt, str(target))
  assert sorted(os.listdir(target)) == ["checkpoints", "config.json", "notes.txt"]
  # A new WORKDIR is the renamed staging folder: made with the permissions any new folder gets.
  fresh, plain = tmp_path / "fresh", tmp_path / "plain"
  import_torch.import_dir(pt, str(fresh))
  plain.mkdir()
  assert os.stat(fresh).st_mode == os.stat(plain).st_mode
