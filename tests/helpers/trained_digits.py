"""A tiny encoder trained 300 steps on 600 digit records with kNN eval on 200 others: the slow tests' trained model."""
import os

import flax.linen as nn
import jax

from tests.helpers import digit_shards
from tests.helpers.train_cli import make_config


def train(root: str) -> dict:
  """Trains once under `root`; returns the data folders, workdir, run summary, encoder module and its
  initial and final params (the encoder built from the config: the trainer's names the training mesh)."""
  from ovenc_jax.model import encoder as model_lib
  from ovenc_jax.train import checkpoint as ckpt_lib
  from ovenc_jax.train import trainer as train_lib
  data = (digit_shards.write_digit_shards(os.path.join(root, "train"), 0, 600, num_shards=4),
          digit_shards.write_digit_shards(os.path.join(root, "eval"), 1000, 200, num_shards=2, seed=1))
  workdir = os.path.join(root, "wd")
  cfg = make_config(*data, total_steps=300, ckpt_every=300, log_every=50, async_ckpt=False,
                    **{"input.global_batch_size": 16, "optim.warmup_steps": 20})
  t = train_lib.Trainer(cfg, workdir)
  initial = nn.meta.unbox(jax.jit(t._init_state)(jax.random.key(cfg.seed))["params"]["encoder"])
  summary = t.run()
  return dict(data=data, workdir=workdir, summary=summary, config=cfg,
              encoder=model_lib.encoder_from_config(cfg.model), initial=initial, final=ckpt_lib.load_params(workdir)[1]["encoder"])
