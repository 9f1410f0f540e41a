"""Run observability: window figures by hand, chip peaks, a tiny run's metrics, its profile and a fake W&B."""
import glob
import json
import os
import sys
import types

import pytest

from ovenc_jax.configs import pretrain
from ovenc_jax.train import observability as obs
from ovenc_jax.train import trainer as train
from tests.helpers import digit_shards
from tests.helpers.train_cli import make_config


def test_window_figures_match_hand_computation():
  f = obs.window_figures(steps=10, seconds=2.0, host_wait_s=0.5, tokens=8000, step=30, total_steps=130,
                         num_devices=8, flops_per_step_per_device=1e12, peak=1e14, peak_memory_bytes=2 ** 31)
  # 10 steps in 2 s: 5 steps/s; 8000 tokens over 8 devices in 2 s; 100 steps left at 5 steps/s.
  expected = dict(tokens_per_s_per_device=500.0, step_time_s=0.2, host_wait_s=0.05, device_time_s=0.15,
                  eta_s=20.0, model_tflops_per_device=5.0, mfu=0.05, peak_memory_gib=2.0)
  assert f.keys() == expected.keys()
  for k, v in expected.items():
    assert f[k] == pytest.approx(v), k
  # An unknown chip: TFLOP/s, no MFU; no memory figure where the backend gives none.
  f = obs.window_figures(steps=4, seconds=1.0, host_wait_s=0.0, tokens=1, step=4, total_steps=4, num_devices=1,
                         flops_per_step_per_device=2e12, peak=None)
  assert f["model_tflops_per_device"] == pytest.approx(8.0) and "mfu" not in f and "peak_memory_gib" not in f
  assert f["eta_s"] == 0.0
  assert obs.format_eta(3725) == "1h02m" and obs.format_eta(65) == "1m05s"


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA B200", 2250e12),
    ("cpu", None), ("Some Accelerator", None)])
def test_peaks_match_device_kinds(kind, peak):
  assert obs.peak_flops(kind) == peak


def test_bad_profile_steps_and_missing_wandb_are_named(monkeypatch):
  for bad in ("5", "0,3", "a,b", "3,0,1"):
    with pytest.raises(ValueError, match="config.profile_steps="):
      obs.parse_profile_steps(bad)
  assert obs.parse_profile_steps("") is None and obs.parse_profile_steps("10,5") == (10, 5)
  c = pretrain.get_config("variant=tiny")
  assert obs.start_wandb(c, "/nonexistent") is None  # off by default: nothing imported or written
  c.wandb.project = "p"
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  with pytest.raises(RuntimeError, match=r"config.wandb.project='p' is set but the wandb package is not installed"):
    train.validate_config(c)


class _FakeRun:
  def __init__(self, **kw):
    self.init, self.logged, self.finished = kw, [], False

  def log(self, scalars, step):
    self.logged.append(dict(scalars, step=step))

  def finish(self):
    self.finished = True


@pytest.mark.slow
def test_tiny_run_logs_figures_traces_and_reaches_wandb(tmp_path, monkeypatch):
  data = digit_shards.write_digit_shards(str(tmp_path / "data"), 0, 64, num_shards=2)
  runs = []
  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
  monkeypatch.setitem(sys.modules, "wandb", fake)
  cfg = make_config(data, **{"input.tokens_per_row": 32, "eval.tokens_per_row": 32, "ckpt_every": 100,
                             "async_ckpt": False, "total_steps": 6, "log_every": 3, "profile_steps": "2,2",
                             "wandb.project": "proj"})
  workdir = str(tmp_path / "run")
  trainer = train.Trainer(cfg, workdir)
  trainer.run()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    windows = [r for r in map(json.loads, f) if "perf/step_time_s" in r]
  assert [r["step"] for r in windows] == [3, 6]
  flops = obs.trainer_step_flops(trainer)
  assert flops == pytest.approx(obs.model_flops(cfg, 8, trainer.abstract_state["params"]["centers"].shape[0])
                                ["total"] / 8)
  for r in windows:
    assert r["perf/tokens_per_s_per_device"] * 8 == pytest.approx(r["tokens_per_s"])
    assert r["perf/model_tflops_per_device"] * 1e12 == pytest.approx(flops / r["perf/step_time_s"])
    assert 0 <= r["perf/host_wait_s"] <= r["perf/step_time_s"]
    assert r["perf/device_time_s"] == pytest.approx(r["perf/step_time_s"] - r["perf/host_wait_s"])
    assert "perf/mfu" not in r  # host CPU devices have no peak in the table
  assert windows[-1]["perf/eta_s"] == 0.0
  assert windows[0]["perf/eta_s"] == pytest.approx(3 * windows[0]["perf/step_time_s"])
  # TensorBoard's profile plugin layout: <logdir>/plugins/profile/<run>/<host>.xplane.pb
  assert glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
  (run,) = runs
  assert run.init["project"] == "proj" and run.init["name"] == "run" and run.finished
  assert [r["step"] for r in run.logged if "perf/mfu" in r or "perf/step_time_s" in r] == [3, 6]
