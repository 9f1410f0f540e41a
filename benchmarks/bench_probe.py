"""Probe evaluation on labelled digit clips: cached-feature throughput, attentive probe training time, and
attentive / linear / kNN top-1 of an initial and a trained tiny encoder on held-out clips.

python benchmarks/bench_probe.py [--json PATH] [--steps 150] [--epochs 20]
Runs on 8 host CPU devices unless JAX_PLATFORMS or XLA_FLAGS say otherwise.
"""
import argparse
import os
import tempfile
import time

from ovenc_jax import sharding


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json")
  ap.add_argument("--steps", type=int, default=150, help="pretraining steps of the tiny encoder")
  ap.add_argument("--epochs", type=int, default=20, help="attentive probe epochs")
  ap.add_argument("--lr", type=float, default=1e-3, help="attentive probe lr")
  ap.add_argument("--tokens_per_row", type=int, default=32)
  a = ap.parse_args(argv)
  sharding.use_host_cpu_devices(8)
  import flax.linen as nn
  import jax
  from ovenc_format import atomic_io
  from ovenc_jax.eval import attentive_probe as probe_lib
  from ovenc_jax.eval import probes
  from ovenc_jax.eval import token_features
  from ovenc_jax.model import encoder as model_lib
  from ovenc_jax.train import checkpoint as ckpt_lib
  from ovenc_jax.train import trainer as train
  from tests.helpers import digit_shards
  from tests.helpers.train_cli import make_config

  root = tempfile.mkdtemp(prefix="bench_probe_")
  pre = digit_shards.write_digit_shards(os.path.join(root, "pre"), 0, 600, num_shards=4)
  splits = (digit_shards.write_digit_shards(os.path.join(root, "train"), 1000, 300, num_shards=2, seed=1),
            digit_shards.write_digit_shards(os.path.join(root, "val"), 1300, 200, num_shards=2, seed=2))
  cfg = make_config(pre, total_steps=a.steps, ckpt_every=a.steps, log_every=50, async_ckpt=False,
                    **{"input.global_batch_size": 16, "optim.warmup_steps": 20})
  t = train.Trainer(cfg, os.path.join(root, "wd"))
  initial = nn.meta.unbox(jax.jit(t._init_state)(jax.random.key(cfg.seed))["params"]["encoder"])
  t.run()
  trained = ckpt_lib.load_params(os.path.join(root, "wd"))[1]["encoder"]
  encoder = model_lib.encoder_from_config(cfg.model)  # the trainer's names the training mesh's axes
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  settings = probe_lib.ProbeSettings(lr=a.lr, epochs=a.epochs, batch_size=16)
  res = dict(devices=jax.device_count(), platform=jax.devices()[0].platform, pretrain_steps=a.steps,
             probe_epochs=a.epochs, train_clips=300, val_clips=200)
  for name, params in (("initial", initial), ("trained", trained)):
    feats = {}
    for split, path in zip(("train", "val"), splits):
      t0 = time.perf_counter()
      feats[split], _ = token_features.extract(encoder, params, path, patch_size=14, tokens_per_row=a.tokens_per_row,
                                               batch_size=16, mesh=mesh, out_dir=os.path.join(root, name, split))
      dt = time.perf_counter() - t0
    if name == "trained":  # the val split of the second encoder: compiled already
      res["probe_feature_clips_per_s"] = len(feats["val"]) / dt
    t0 = time.perf_counter()
    out = probe_lib.run_probe(feats["train"], feats["val"], 10, settings, mesh=mesh)
    if name == "trained":  # the same shapes as the first: compiled already
      res["probe_train_s"] = time.perf_counter() - t0
    pooled = token_features.pooled(feats["train"]), token_features.pooled(feats["val"])
    res[f"attentive_top1_{name}"] = out["top1"]
    res[f"linear_top1_{name}"] = probes.fit_linear_top1(pooled[0], feats["train"].labels, pooled[1],
                                                        feats["val"].labels)[0]
    res[f"knn_top1_{name}"] = probes.fit_knn_top1(pooled[0], feats["train"].labels, pooled[1], feats["val"].labels)
  print("| encoder | attentive top-1 | linear top-1 (mean-pool) | kNN top-1 (mean-pool) |")
  print("|---|---|---|---|")
  for name in ("initial", "trained"):
    print(f"| {name} | {res[f'attentive_top1_{name}']:.3f} | {res[f'linear_top1_{name}']:.3f} | "
          f"{res[f'knn_top1_{name}']:.3f} |")
  print(f"probe_feature_clips_per_s {res['probe_feature_clips_per_s']:.1f}, probe_train_s {res['probe_train_s']:.2f} "
        f"({res['devices']} {res['platform']} devices)")
  if a.json:
    atomic_io.save_json(a.json, res)
  return res


if __name__ == "__main__":
  main()
