"""Probe a frozen encoder on labelled train/val record folders: attentive (the paper's protocol), linear or kNN.

python -m ovenc_jax.evaluate --model WORKDIR_OR_EXPORT --train TRAIN_RECORDS --val VAL_RECORDS \\
    --output OUT [--probe attentive --probe linear --probe knn] [--lr 1e-4 3e-4 ...]
--model is a training workdir (config.json + checkpoints) or an exported PyTorch/HF folder
(config.json + model.safetensors, read through ovenc_jax.interop.import_torch). Token features are
computed once into OUT/features/{train,val} and reused by later runs (--reuse_features).
Writes OUT/results.json and OUT/results.md (dataset, frames, tokens, probe, lr, top-1, top-5).
"""
import argparse
import json
import logging
import sys
import time

import jax
import numpy as np

from ovenc_format import atomic_io
from ovenc_format import failures as failures_lib
from ovenc_format import paths as pathio
from ovenc_jax.eval import attentive_probe as probe_lib
from ovenc_jax.eval import embed as embed_lib
from ovenc_jax.eval import probes
from ovenc_jax.eval import token_features
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import checkpoint as ckpt_lib

PROBES = ("attentive", "linear", "knn")
# The published weights place sampled frames on a 64-frame timeline.
EXPORT_TEMPORAL_POSITIONS = "timeline64"


def load_model(path: str, step: int | None = None):
  """(encoder module, encoder params, temporal positions it was trained with) of a workdir or an export folder."""
  if pathio.is_file(pathio.join(path, "model.safetensors")):
    from ovenc_jax.interop import import_torch  # torch is needed only for exported weights
    cfg, params = import_torch.read_export(path)
    return model_lib.encoder_from_config(cfg), params["encoder"], EXPORT_TEMPORAL_POSITIONS
  cfg = embed_lib.load_model_config(path)
  _, params = ckpt_lib.load_params(path, step)
  return model_lib.encoder_from_config(cfg), params["encoder"], embed_lib.temporal_positions_of(path)


def _model_key(args) -> str:
  return f"{pathio.absolute(args.model)}@{args.step if args.step is not None else 'latest'}"


def _features(args, split, model, mesh):
  out = pathio.join(args.output, "features", split)
  records = getattr(args, split)
  meta_path = pathio.join(out, token_features.META_FILE)
  if args.reuse_features and pathio.is_file(meta_path):
    meta = json.loads(pathio.as_path(meta_path).read_text())
    if meta["source"] == pathio.absolute(records) and meta.get("model") == _model_key(args):
      return token_features.load(out), meta, []
  encoder, params, temporal_positions = model()
  t0 = time.perf_counter()
  feats, stats = token_features.extract(
      encoder, params, records, patch_size=encoder.patch_size, tokens_per_row=args.tokens_per_row,
      temporal_positions=temporal_positions, batch_size=args.batch_size, mesh=mesh, out_dir=out,
      batch_key="--batch_size", what=f"--{split}")
  meta = dict(stats.as_dict(), seconds=time.perf_counter() - t0, temporal_positions=temporal_positions)
  # The model the cache was made with: --reuse_features ignores a cache of another model or step.
  written = json.loads(pathio.as_path(meta_path).read_text())
  atomic_io.save_json(meta_path, dict(written, model=_model_key(args)))
  return feats, meta, stats.failures


def _label_space(train_labels, val_labels):
  """Train classes -> 0..C-1; a val class absent from train maps to -1 (never predicted, counted wrong)."""
  classes = np.unique(train_labels)
  pos = np.clip(np.searchsorted(classes, val_labels), 0, max(len(classes) - 1, 0))
  val = np.where(classes[pos] == val_labels, pos, -1) if len(classes) else np.full(len(val_labels), -1)
  return classes, np.searchsorted(classes, train_labels).astype(np.int32), val.astype(np.int32)


def run(args) -> list[dict]:
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  loaded = []

  def model():  # loaded only when a split's features are not cached
    if not loaded:
      encoder, params, tp = load_model(args.model, args.step)
      loaded.append((encoder, params, tp if args.temporal_positions == "auto" else args.temporal_positions))
    return loaded[0]

  feats, metas, bad = {}, {}, []
  for split in ("train", "val"):
    feats[split], metas[split], failed = _features(args, split, model, mesh)
    bad += failed
  tp = metas["val"]["temporal_positions"]
  total = metas["train"]["records"] + metas["val"]["records"]
  report = failures_lib.write_report(pathio.join(args.output, "failures.jsonl"), bad)
  failures_lib.check(len(bad), total, args.max_failure_fraction, report, "records",
                     num_written=len(feats["train"]) + len(feats["val"]))
  tr, va = feats["train"], feats["val"]
  probes.check_probeable(np.asarray(tr.labels), f"--train {args.train}")
  if len(va) == 0:
    raise probes.ProbeDataError(f"--val {args.val}: no labelled samples")
  classes, ytr, yva = _label_space(np.asarray(tr.labels), np.asarray(va.labels))
  common = dict(dataset=args.dataset or args.val.rstrip("/").split("/")[-1], model=args.model,
                frames=round(metas["val"]["frames_per_clip"], 2), tokens=round(metas["val"]["tokens_per_clip"], 1),
                num_classes=len(classes), train_clips=len(tr), val_clips=len(va), temporal_positions=tp,
                feature_stats=metas)
  rows = []
  pooled = None
  for probe in args.probe:
    if probe == "attentive":
      train_feats = probe_lib.Features(tr.tokens, tr.mask, ytr)
      lrs, chosen = args.lr, {}
      if args.select_lr:
        s = probe_lib.ProbeSettings(min_lr=args.min_lr, schedule=args.schedule, batch_size=args.probe_batch_size,
                                    epochs=args.epochs, seed=args.seed)
        best, scores = probe_lib.select_lr(train_feats, len(classes), s, args.lr, mesh=mesh,
                                           batch_key="--probe_batch_size", holdout=args.select_holdout)
        lrs, chosen = [best], dict(lr_selected_on="train holdout", holdout_top1={str(k): v for k, v in scores.items()})
      for lr in lrs:
        s = probe_lib.ProbeSettings(lr=lr, min_lr=args.min_lr, schedule=args.schedule, batch_size=args.probe_batch_size,
                                    epochs=args.epochs, seed=args.seed)
        t0 = time.perf_counter()
        res = probe_lib.run_probe(train_feats, probe_lib.Features(va.tokens, va.mask, yva),
                                  len(classes), s, mesh=mesh, batch_key="--probe_batch_size")
        rows.append(dict(common, probe="attentive", lr=lr, epochs=s.resolved_epochs(len(tr)), top1=res["top1"],
                         top5=res["top5"], train_loss=res["probe_train_loss"], seconds=time.perf_counter() - t0,
                         **chosen))
      continue
    if pooled is None:
      pooled = token_features.pooled(tr), token_features.pooled(va)
    if probe == "linear":
      top1, top5 = probes.fit_linear_top1(pooled[0], ytr, pooled[1], yva, seed=args.seed)
    else:
      top1, top5 = probes.fit_knn_top1(pooled[0], ytr, pooled[1], yva, k=args.knn_k), float("nan")
    rows.append(dict(common, probe=probe, lr=None, top1=top1, top5=top5))
  return rows


def write_results(output: str, rows: list[dict]) -> tuple[str, str]:
  js = atomic_io.save_json(pathio.join(output, "results.json"), rows)
  fmt = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.2f}"
  lines = ["| dataset | frames | tokens | probe | lr | top-1 | top-5 |", "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['dataset']} | {r['frames']} | {r['tokens']} | {r['probe']} | {r['lr'] if r['lr'] else '-'} | "
            f"{fmt(r['top1'])} | {fmt(r['top5'])} |" for r in rows]
  md = pathio.join(output, "results.md")
  atomic_io.atomic_write(md, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
  return js, md


def parser() -> argparse.ArgumentParser:
  d = probe_lib.DEFAULTS
  ap = argparse.ArgumentParser(prog="python -m ovenc_jax.evaluate", description=__doc__, allow_abbrev=False,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="training workdir or exported PyTorch/HF folder")
  ap.add_argument("--train", required=True, help="labelled record folder (class_label set) to fit probes on")
  ap.add_argument("--val", required=True, help="labelled record folder to report top-1/top-5 on")
  ap.add_argument("--output", required=True)
  ap.add_argument("--probe", action="append", choices=PROBES, help="repeatable (default: attentive)")
  ap.add_argument("--dataset", default="", help="name in the results table (default: --val's folder name)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: latest)")
  ap.add_argument("--tokens_per_row", type=int, default=2048,
                  help="token budget per clip; longer clips keep their highest-scored tokens")
  ap.add_argument("--temporal_positions", default="auto", choices=("auto", "sample_index", "timeline64"),
                  help="auto: the workdir's input.temporal_positions; timeline64 for exported weights")
  ap.add_argument("--batch_size", type=int, default=32, help="clips per feature-extraction batch")
  ap.add_argument("--reuse_features", action="store_true",
                  help="reuse OUTPUT/features of the same record folders (an lr sweep without the encoder)")
  ap.add_argument("--lr", type=float, nargs="+", default=[d["lr"]], help="attentive probe lr(s), one row each")
  ap.add_argument("--select_lr", action="store_true",
                  help="pick one of --lr by top-1 on a per-class holdout of --train (never --val), refit on all "
                       "of --train and report that one row: a principled lr for small sets")
  ap.add_argument("--select_holdout", type=float, default=0.2, help="--train share held out by --select_lr")
  ap.add_argument("--min_lr", type=float, default=d["min_lr"])
  ap.add_argument("--schedule", choices=probe_lib.SCHEDULES, default=d["schedule"])
  ap.add_argument("--epochs", type=int, default=0,
                  help=f"0: {d['epochs']}, or {d['small_set_epochs']} below {d['small_set_size']} train clips")
  ap.add_argument("--probe_batch_size", type=int, default=d["batch_size"])
  ap.add_argument("--knn_k", type=int, default=10)
  ap.add_argument("--seed", type=int, default=0)
  failures_lib.add_flag(ap, "records (unreadable ones, listed in failures.jsonl)")
  return ap


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  ap = parser()
  args = ap.parse_args(argv)
  args.probe = list(dict.fromkeys(args.probe or ["attentive"]))
  try:
    pathio.check_writable(args.output, "--output")
    pathio.makedirs(args.output)
    rows = run(args)
  except failures_lib.TooManyFailures as e:
    print(f"{ap.prog}: error: {e}", file=sys.stderr)
    sys.exit(failures_lib.EXIT_CODE)
  except (ValueError, FileNotFoundError) as e:
    ap.error(str(e))
  paths = write_results(args.output, rows)
  print(pathio.as_path(paths[1]).read_text(), end="")
  print("wrote " + ", ".join(paths))
  return rows


if __name__ == "__main__":
  main()
