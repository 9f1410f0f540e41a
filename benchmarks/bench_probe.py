"""Probe evaluation on labelled digit clips: cached-feature throughput, attentive probe training time, and
attentive / linear / kNN top-1 of an initial and a trained tiny encoder on held-out clips.

python benchmarks/bench_probe.py [--json PATH] [--select_lrs 1e-4 3e-4 1e-3]
The encoder is the slow tests' one (tests/helpers/trained_digits.py: 300 steps on 600 digits). The
attentive probe runs twice: the published protocol's settings as they are (lr 1e-4, 30 epochs below
10k clips, batch 32), and with its lr picked among --select_lrs on a holdout of the train split.
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
  ap.add_argument("--select_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                  help="attentive probe lrs to pick from on a 20%% holdout of the train split")
  ap.add_argument("--tokens_per_row", type=int, default=32)
  a = ap.parse_args(argv)
  sharding.use_host_cpu_devices(8)
  import dataclasses
  import jax
  from ovenc_format import atomic_io
  from ovenc_jax.eval import attentive_probe as probe_lib
  from ovenc_jax.eval import probes
  from ovenc_jax.eval import token_features
  from tests.helpers import digit_shards
  from tests.helpers import trained_digits

  root = tempfile.mkdtemp(prefix="bench_probe_")
  run = trained_digits.train(os.path.join(root, "pretrain"))
  splits = (digit_shards.write_digit_shards(os.path.join(root, "train"), 1000, 300, num_shards=2, seed=1),
            digit_shards.write_digit_shards(os.path.join(root, "val"), 1300, 200, num_shards=2, seed=2))
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  settings = probe_lib.ProbeSettings()
  res = dict(devices=jax.device_count(), platform=jax.devices()[0].platform, pretrain_steps=run["config"].total_steps,
             probe_epochs=settings.resolved_epochs(300), probe_lr=settings.lr, probe_batch_size=settings.batch_size,
             train_clips=300, val_clips=200)
  for name, params in (("initial", run["initial"]), ("trained", run["final"])):
    feats = {}
    for split, path in zip(("train", "val"), splits):
      t0 = time.perf_counter()
      feats[split], _ = token_features.extract(run["encoder"], params, path, patch_size=14,
                                               tokens_per_row=a.tokens_per_row, batch_size=16, mesh=mesh,
                                               out_dir=os.path.join(root, name, split))
      dt = time.perf_counter() - t0
    if name == "trained":  # the val split of the second params set: compiled already
      res["probe_feature_clips_per_s"] = len(feats["val"]) / dt
    t0 = time.perf_counter()
    out = probe_lib.run_probe(feats["train"], feats["val"], 10, settings, mesh=mesh)
    if name == "trained":  # the same shapes as the first: compiled already
      res["probe_train_s"] = time.perf_counter() - t0
    res[f"attentive_top1_{name}"] = out["top1"]
    best, scores = probe_lib.select_lr(feats["train"], 10, settings, a.select_lrs, mesh=mesh)
    sel = probe_lib.run_probe(feats["train"], feats["val"], 10, dataclasses.replace(settings, lr=best), mesh=mesh)
    res[f"attentive_selected_top1_{name}"], res[f"attentive_selected_lr_{name}"] = sel["top1"], best
    res[f"attentive_holdout_top1_{name}"] = {str(k): v for k, v in scores.items()}
    pooled = token_features.pooled(feats["train"]), token_features.pooled(feats["val"])
    res[f"linear_top1_{name}"] = probes.fit_linear_top1(pooled[0], feats["train"].labels, pooled[1],
                                                        feats["val"].labels)[0]
    res[f"knn_top1_{name}"] = probes.fit_knn_top1(pooled[0], feats["train"].labels, pooled[1], feats["val"].labels)
  print("| encoder | attentive top-1 (published settings) | attentive top-1 (lr picked on train holdout) | "
        "linear top-1 (mean-pool) | kNN top-1 (mean-pool) |")
  print("|---|---|---|---|---|")
  for name in ("initial", "trained"):
    print(f"| {name} | {res[f'attentive_top1_{name}']:.3f} | {res[f'attentive_selected_top1_{name}']:.3f} "
          f"(lr {res[f'attentive_selected_lr_{name}']:g}) | {res[f'linear_top1_{name}']:.3f} | "
          f"{res[f'knn_top1_{name}']:.3f} |")
  print(f"probe_feature_clips_per_s {res['probe_feature_clips_per_s']:.1f}, probe_train_s {res['probe_train_s']:.2f} "
        f"({res['devices']} {res['platform']} devices)")
  if a.json:
    atomic_io.save_json(a.json, res)
  return res


if __name__ == "__main__":
  main()
