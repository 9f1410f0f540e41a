"""Configs through `ovenc_jax.main`'s flag parser (keys, None, sources, warmup, default config), read without jax."""
import json
import subprocess
import sys

import pytest

from ovenc_jax.configs import pretrain
from ovenc_jax.input import defaults as input_defaults
from tests.helpers.train_cli import printed_config

# key -> (command-line value, parsed value); README / docs name each of them.
OVERRIDES = {
    "loss.fn_threshold": ("None", None),
    "optim.clip_norm": ("None", None),
    "loss.num_classes": ("32", 32),
    "input.label_table": ("concepts/labels.npz", "concepts/labels.npz"),
    "input.sources": ("a/:0.25+gs://b/c", [{"path": "a/", "weight": 0.25}, {"path": "gs://b/c", "weight": 1.0}]),
    "init_from": ("runs/from_torch", "runs/from_torch"),
    "mesh.fsdp": ("4", 4),
    "mesh.dcn_data": ("2", 2),
    "model.attention": ("chunked", "chunked"),
    "model.dtype": ("bfloat16", "bfloat16"),
    "optim.grad_accum_steps": ("2", 2),
    "max_bad_steps": ("7", 7),
    "fetch_metrics_every_step": ("True", True),
}


def _get(cfg, key):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def test_documented_overrides_parse_through_main():
  cfg = printed_config("variant=base,data=videos/:0.7+images/:0.3",
                       *[f"--config.{k}={v}" for k, (v, _) in OVERRIDES.items()])
  for key, (_, want) in OVERRIDES.items():
    got = _get(cfg, key)
    if key == "input.sources":
      got = input_defaults.source_list(got)
    assert got == want, (key, got, want)
  # A float set back to a number stays a number.
  assert printed_config("variant=tiny", "--config.loss.fn_threshold=0.5")["loss"]["fn_threshold"] == 0.5


def test_sources_config_arg_mixes_weighted_sources():
  want = [{"path": "videos/", "weight": 0.7}, {"path": "images/", "weight": 0.3}]
  assert list(pretrain.get_config("variant=tiny,data=videos/:0.7+images/:0.3").input.sources) == want
  assert list(pretrain.get_config("variant=tiny,sources=videos/:0.7+images/:0.3").input.sources) == want
  assert list(pretrain.get_config("variant=tiny,data=gs://b/x").input.sources) == [{"path": "gs://b/x", "weight": 1.0}]
  with pytest.raises(ValueError, match="empty path"):
    input_defaults.parse_sources("a/:0.5+:0.5")


def test_official_warmup_follows_total_steps_set_on_the_command_line():
  built = pretrain.get_config("variant=base,recipe=official")
  assert (built.total_steps, built.optim.warmup_steps) == (100_000, 10_000)
  cfg = printed_config("variant=base,recipe=official", "--config.total_steps=3000")
  assert (cfg["total_steps"], cfg["optim"]["warmup_steps"]) == (3000, 300)
  # tiny's own total_steps, then the flag; a warmup given outright stays as given.
  assert printed_config("variant=tiny,recipe=official")["optim"]["warmup_steps"] == 20
  cfg = printed_config("variant=tiny,recipe=official", "--config.total_steps=50", "--config.optim.warmup_steps=7")
  assert (cfg["total_steps"], cfg["optim"]["warmup_steps"]) == (50, 7)
  # The default recipe's warmup is a number of its own.
  assert printed_config("variant=base", "--config.total_steps=3000")["optim"]["warmup_steps"] == 100


def test_configs_read_without_jax(tmp_path):
  code = ("import sys\n"
          "from ovenc_jax.configs import pretrain\n"
          "c = pretrain.get_config('variant=tiny')\n"
          "for arg in ('variant=base,recipe=official', 'variant=large,pod=v5e-256', 'variant=tiny,data=a/:1+b/'):\n"
          "  pretrain.get_config(arg).to_json()\n"
          "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax', 'grain'))\n"
          "print('HEAVY', heavy)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "HEAVY []" in r.stdout, r.stdout


def test_main_runs_from_any_directory_with_the_packaged_config(tmp_path):
  r = subprocess.run([sys.executable, "-m", "ovenc_jax.main", "--help"], cwd=tmp_path, capture_output=True,
                     text=True, timeout=120)
  # absl's --help exits 1 after printing the flags.
  assert "--workdir" in r.stdout and str(pretrain.__file__) in r.stdout, r.stdout + r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  r = subprocess.run([sys.executable, "-m", "ovenc_jax.main", "--print_config"], cwd=tmp_path, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout)["model"]["variant"] == "tiny"


@pytest.mark.parametrize("flag, names", [
    ("--config.optim.learning_rate=1", "--config.optim.learning_rate=1: the config has no key 'learning_rate'"),
    ("--config.total_steps=many", "--config.total_steps=many"),
    ("--no_such_flag=1", "no_such_flag"),
])
def test_flag_errors_are_one_line_with_exit_2(tmp_path, flag, names):
  work = tmp_path / "run"
  args = [sys.executable, "-m", "ovenc_jax.main", f"--workdir={work}", flag]
  r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.count("ovenc-train: error: ") == 1 and names in r.stderr, r.stderr
  assert "Traceback" not in r.stderr and not work.exists()
  r = subprocess.run(args + ["--verbose"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr, r.stderr[-3000:]
  assert r.stderr.rstrip().splitlines()[-1].startswith("ovenc-train: error: ")


def test_a_config_file_that_raises_is_one_line_naming_the_arg(tmp_path):
  r = subprocess.run([sys.executable, "-m", "ovenc_jax.main", f"--config={pretrain.__file__}:variant=giant",
                      "--print_config"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-3000:]
  line, = [l for l in r.stderr.splitlines() if l.startswith("ovenc-train: error: ")]
  assert "variant='giant' is unknown" in line and "Traceback" not in r.stderr, r.stderr
