"""Every documented config key set through the real `ovenc_jax.main` flag parser, None values and source mixes included."""
import json
import subprocess
import sys

import pytest

from ovenc_jax.configs import pretrain
from ovenc_jax.input import pipeline as input_pipeline
from tests.test_train import ROOT

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


def _printed(config_arg, *flags):
  r = subprocess.run([sys.executable, "-m", "ovenc_jax.main", f"--config=ovenc_jax/configs/pretrain.py:{config_arg}",
                      "--print_config", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout)


def _get(cfg, key):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def test_documented_overrides_parse_through_main():
  cfg = _printed("variant=base,data=videos/:0.7+images/:0.3",
                 *[f"--config.{k}={v}" for k, (v, _) in OVERRIDES.items()])
  for key, (_, want) in OVERRIDES.items():
    got = _get(cfg, key)
    if key == "input.sources":
      got = input_pipeline.source_list(got)
    assert got == want, (key, got, want)
  # A float set back to a number stays a number.
  assert _printed("variant=tiny", "--config.loss.fn_threshold=0.5")["loss"]["fn_threshold"] == 0.5


def test_sources_config_arg_mixes_weighted_sources():
  want = [{"path": "videos/", "weight": 0.7}, {"path": "images/", "weight": 0.3}]
  assert list(pretrain.get_config("variant=tiny,data=videos/:0.7+images/:0.3").input.sources) == want
  assert list(pretrain.get_config("variant=tiny,sources=videos/:0.7+images/:0.3").input.sources) == want
  assert list(pretrain.get_config("variant=tiny,data=gs://b/x").input.sources) == [{"path": "gs://b/x", "weight": 1.0}]
  with pytest.raises(ValueError, match="empty path"):
    input_pipeline.parse_sources("a/:0.5+:0.5")
