"""Accuracy against training FLOPs by token budget and selection rule (codec, random, uniform frames, dense)."""
# python benchmarks/bench_sparsity.py [--quick] [--json PATH] [--workdir DIR] [--plot PNG] [--steps N]
#
# Demo clips (train + held-out, as run_demo.sh makes them) -> codec_patchify once per rule and budget ->
# one label table (glyph teacher on the dense records + k-means) shared by every run, joined by sample_id ->
# the tiny encoder trained for the same steps on one clip per row (K tokens, no padding) -> kNN top-1 and
# linear probe on the held-out clips' digits, encoded with the run's rule. Training FLOPs are XLA's count
# of the compiled train step times the steps.
import argparse
import json
import logging
import os
import tempfile
import time

import jax
import numpy as np

from data_prep import cluster, codec_patchify, glyph_teacher, make_demo_data
from ovenc_format import atomic_io
from ovenc_jax.configs import pretrain
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.train import trainer as train

RULES = ("codec", "random", "uniform_frames")  # at each budget; dense once
NUM_CONCEPTS = 32
# Full run: the demo's clips and image size; 8 of each clip's 16 frames so that dense (512 tokens) stays
# affordable on a two-core CPU machine. Quick: a few small clips, one budget, one seed, a few steps.
FULL = dict(train_clips=800, eval_clips=150, image_size=112, num_frames=8, budgets=(0.0625, 0.125, 0.25),
            seeds=3, steps=200, batch=16, lr=5e-4, warmup=20)
QUICK = dict(train_clips=40, eval_clips=60, image_size=56, num_frames=4, budgets=(0.125,), seeds=1,
             steps=4, batch=8, lr=5e-4, warmup=1)


def cell_name(rule, budget):
  return "dense" if rule == "dense" else f"{rule}@{budget * 100:g}%"


def prepare_records(root, split, rule, budget, a, beam_flags):
  out = os.path.join(root, "records", f"{rule}_{budget:g}", split)
  if not os.path.exists(os.path.join(out, "manifest.json")):
    codec_patchify.run(["--input", os.path.join(root, split, "list.txt"), "--output_dir", out,
                        "--image_size", str(a.image_size), "--num_frames", str(a.num_frames),
                        "--selector", rule, "--budget", str(budget), "--decode_timeout", "0",
                        "--class_labels", os.path.join(root, split, "class_labels.json"), *beam_flags])
  with open(os.path.join(out, "manifest.json")) as f:
    m = json.load(f)
  if m["num_failures"] or m["num_images"]:
    raise ValueError(f"{out}: expected only videos and no failures, got {m['num_failures']} failures, "
                     f"{m['num_images']} images")
  # Every record holds exactly K tokens, so a row of K tokens is one clip and no padding.
  if m["num_tokens"] != m["num_keep_per_video"] * m["num_records"]:
    raise ValueError(f"{out}: {m['num_tokens']} tokens in {m['num_records']} records, not "
                     f"{m['num_keep_per_video']} each")
  return out, int(m["num_keep_per_video"])


def train_one(data, eval_data, labels, k, seed, workdir, a):
  cfg = pretrain.get_config(f"variant=tiny,data={data},eval_data={eval_data}")
  cfg.input.update(label_table=labels, global_batch_size=a.batch, tokens_per_row=k, max_segments=1,
                   seed=seed)
  cfg.loss.num_classes = NUM_CONCEPTS
  cfg.optim.update(lr=a.lr, warmup_steps=a.warmup)
  cfg.update(seed=seed, total_steps=a.steps, log_every=max(1, a.steps // 5), eval_every=0,
             ckpt_every=a.steps, async_ckpt=False)
  cfg.eval.update(tokens_per_row=k, batch_size=a.batch, linear_probe=True)
  trainer = train.Trainer(cfg, workdir, devices=jax.local_devices()[:1])
  t0 = time.perf_counter()
  summary = trainer.run()
  wall = time.perf_counter() - t0
  batch = next(input_pipeline.make_train_iterator(cfg.input))
  if not (batch["segment_ids"] > 0).all():
    raise AssertionError(f"{data}: a training row is padded; FLOPs would count unseen tokens")
  return summary["final_eval"], wall, trainer.step_flops(batch)


def mean_std(xs):
  xs = np.asarray(xs, np.float64)
  return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0


def format_table(cells, a):
  dense = next((c for c in cells if c["rule"] == "dense"), None)
  lines = ["| rule | budget | tokens/clip | train TFLOPs | vs dense | wall s | kNN top-1 | linear probe |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for c in cells:
    ratio = f"{c['train_flops'] / dense['train_flops']:.3f}" if dense else "-"
    lines.append(f"| {c['rule']} | {c['budget'] * 100:g}% | {c['tokens_per_clip']} | "
                 f"{c['train_flops'] / 1e12:.3f} | {ratio} | {c['wall_s_mean']:.0f} | "
                 f"{c['knn_mean']:.3f} +- {c['knn_std']:.3f} | {c['probe_mean']:.3f} +- {c['probe_std']:.3f} |")
  return "\n".join(lines)


def plot(cells, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
  for rule, marker in zip(RULES + ("dense",), "os^D"):
    rows = sorted((c for c in cells if c["rule"] == rule), key=lambda c: c["train_flops"])
    if not rows:
      continue
    x = [c["train_flops"] for c in rows]
    for ax, key in zip(axes, ("knn", "probe")):
      ax.errorbar(x, [c[f"{key}_mean"] for c in rows], yerr=[c[f"{key}_std"] for c in rows],
                  marker=marker, capsize=3, label=rule)
  for ax, title in zip(axes, ("kNN top-1", "linear probe")):
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (XLA count, log)")
    ax.set_ylabel(f"held-out digit accuracy ({title})")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend()
  fig.suptitle("Held-out accuracy vs training FLOPs, one point per token budget, mean +- std over seeds")
  fig.tight_layout()
  tmp = f"{path}.tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="a short run on a few small clips")
  ap.add_argument("--json")
  ap.add_argument("--workdir", help="data, records, runs, table.md (default: a temp dir)")
  ap.add_argument("--plot", help="PNG path (default WORKDIR/sparsity.png)")
  for key, value in FULL.items():
    if key != "budgets":
      ap.add_argument(f"--{key}", type=type(value), default=None, help=f"full run: {value}")
  ap.add_argument("--budgets", type=lambda s: tuple(float(x) for x in s.split(",")), default=None)
  ap.add_argument("--beam_workers", type=int, default=2, help="Beam DirectRunner processes (full run)")
  a = ap.parse_args(argv)
  for key, value in (QUICK if a.quick else FULL).items():
    if getattr(a, key) is None:
      setattr(a, key, value)
  logging.basicConfig(level=logging.WARNING)
  logging.getLogger("apache_beam").setLevel(logging.ERROR)
  root = a.workdir or tempfile.mkdtemp(prefix="bench_sparsity_")
  os.makedirs(root, exist_ok=True)
  # Seeds of one cell compile the same step: let XLA's persistent cache skip the repeats.
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  beam_flags = [] if a.quick or a.beam_workers < 2 else [
      f"--direct_num_workers={a.beam_workers}", "--direct_running_mode=multi_processing"]
  t_start = time.perf_counter()

  for split, n, seed in (("data", a.train_clips, 0), ("eval_data", a.eval_clips, 1)):
    if not os.path.exists(os.path.join(root, split, "list.txt")):
      make_demo_data.make_demo_data(os.path.join(root, split), num_clips=n, num_images=0, seed=seed,
                                    size=a.image_size)
  # 12.5% and dense first: the headline figures stand even if a long run is cut short (results are
  # written after every cell, and finished runs are skipped when the same workdir is run again).
  order = sorted(a.budgets, key=lambda b: (b != 0.125, b))
  specs = [(rule, b) for rule in RULES for b in order[:1]] + [("dense", 1.0)] + [
      (rule, b) for b in order[1:] for rule in RULES]

  def records_of(rule, b):
    return {split: prepare_records(root, split, rule, b, a, beam_flags) for split in ("data", "eval_data")}

  # One label table for every run: the teacher sees whole clips (dense records), so the concepts
  # describe the clip rather than any rule's view of it; runs differ only in their tokens.
  labels = os.path.join(root, "concepts", "labels.npz")
  if not os.path.exists(labels):
    glyph_teacher.run(records_of("dense", 1.0)["data"][0], os.path.join(root, "teacher"))
    cluster.main(["--embeddings", os.path.join(root, "teacher"), "--num_clusters", str(NUM_CONCEPTS),
                  "--top_k", "3", "--output", os.path.join(root, "concepts"), "--iters", "10"])

  cells, res = [], {}
  settings = {key: getattr(a, key) for key in ("train_clips", "eval_clips", "image_size", "num_frames", "steps",
                                              "batch", "lr", "warmup")}
  for rule, b in specs:
    recs = records_of(rule, b)
    (data, k), (eval_data, k_eval) = recs["data"], recs["eval_data"]
    if k != k_eval:
      raise AssertionError(f"{cell_name(rule, b)}: {k} tokens per train clip, {k_eval} per held-out clip")
    runs = []
    for seed in range(a.seeds):
      work = os.path.join(root, "runs", f"{rule}_{b:g}_seed{seed}")
      done = os.path.join(work, "bench_result.json")
      if os.path.exists(done):
        with open(done) as f:
          runs.append(json.load(f))
        if runs[-1]["settings"] != settings:
          raise ValueError(f"{done}: made with {runs[-1]['settings']}, not {settings}; use another --workdir")
        continue
      ev, wall, step_flops = train_one(data, eval_data, labels, k, seed, work, a)
      runs.append(dict(seed=seed, knn=ev["knn_top1"], probe=ev["linear_probe"], wall_s=wall,
                       step_flops=step_flops, settings=settings))
      atomic_io.save_json(done, runs[-1])
      print(f"{cell_name(rule, b)} seed {seed}: kNN {ev['knn_top1']:.3f} probe {ev['linear_probe']:.3f} "
            f"({wall:.0f}s)", flush=True)
    knn, probe = mean_std([r["knn"] for r in runs]), mean_std([r["probe"] for r in runs])
    step_flops = runs[0]["step_flops"]
    cells.append(dict(rule=rule, budget=b, tokens_per_clip=k, step_flops=step_flops,
                      train_flops=step_flops * a.steps, tokens_seen=a.steps * a.batch * k,
                      wall_s_mean=float(np.mean([r["wall_s"] for r in runs])),
                      knn_mean=knn[0], knn_std=knn[1], probe_mean=probe[0], probe_std=probe[1], runs=runs))
    res = write_results(cells, a, root, t_start)
  return report(res, a)


def write_results(cells, a, root, t_start):
  """The JSON figures, table.md and the PNG from the cells so far (rewritten after every cell)."""
  def knn_of(rule, b):
    return next((c["knn_mean"] for c in cells if c["rule"] == rule and c["budget"] == b), None)

  res = dict(cells=cells, settings={k: getattr(a, k) for k in FULL}, quick=a.quick,
             total_s=time.perf_counter() - t_start)
  codec, random, dense = knn_of("codec", 0.125), knn_of("random", 0.125), knn_of("dense", 1.0)
  if codec is not None and random is not None:
    res["codec_minus_random_knn_12_5"] = codec - random
  if codec is not None and dense is not None:
    res["codec_12_5_minus_dense_knn"] = codec - dense
  res["table"] = format_table(cells, a)
  atomic_io.atomic_write(os.path.join(root, "table.md"), lambda f: f.write(res["table"] + "\n"), mode="w")
  res["plot"] = plot(cells, a.plot or os.path.join(root, "sparsity.png"))
  if a.json:
    atomic_io.save_json(a.json, res)
  return res


def report(res, a):
  table, png = res["table"], res["plot"]
  print(f"\ntiny encoder, {a.train_clips} train / {a.eval_clips} held-out clips at {a.image_size} px, "
        f"T={a.num_frames}, {a.steps} steps x {a.batch} clips, {a.seeds} seed(s) per cell; "
        f"kNN / probe: mean +- std over seeds; wall s per run (compile + 2 evals + training)")
  print(table)
  for key, goal in (("codec_minus_random_knn_12_5", "+0.05"), ("codec_12_5_minus_dense_knn", "-0.02")):
    if key in res:
      print(f"{key} = {res[key]:+.3f} (goal >= {goal})")
  print(f"plot: {png}; total {res['total_s']:.0f}s")
  return res


if __name__ == "__main__":
  main()
