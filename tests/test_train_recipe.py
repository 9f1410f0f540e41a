"""The recipe=official preset trains end to end: published init, per-group clipping, official loss."""
import numpy as np

from ovenc_jax.configs import pretrain
from ovenc_jax.train import trainer as train
from tests.test_train import data, overrides  # noqa: F401  (data is a fixture)


def test_official_preset_trains(data, tmp_path):
  train_dir, _ = data
  c = pretrain.get_config(f"variant=tiny,data={train_dir},recipe=official")
  for key, value in overrides(total_steps=6, **{"input.max_labels": 1}).items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  c.optim.warmup_steps = 1
  trainer = train.Trainer(c, str(tmp_path))
  state = trainer.init_state(0)
  ctr = np.asarray(state["params"]["centers"])[:10]
  np.testing.assert_allclose(ctr.std(), 0.01, rtol=0.2)  # N(0, 0.01), not unit rows
  summary = trainer.run()
  assert np.isfinite(summary["final_loss"])
  assert summary["final_step"] == 6
