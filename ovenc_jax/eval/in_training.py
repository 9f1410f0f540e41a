"""The trainer's periodic evaluation of the held-out set: kNN, linear probe and a cheap attentive probe, robust to imperfect data."""
import logging
import math

import jax
import numpy as np
from jax.experimental import multihost_utils

from ovenc_jax.eval import attentive_probe as probe_lib
from ovenc_jax.eval import defaults as eval_defaults
from ovenc_jax.eval import probes
from ovenc_jax.input import global_arrays
from ovenc_jax.input import pipeline as input_pipeline

log = logging.getLogger("ovenc_jax.eval.in_training")


def attentive_config(config) -> dict:
  return dict(eval_defaults.ATTENTIVE_IN_TRAINING, **dict(config.eval.get("attentive", None) or {}))


def check_config(config, mesh, batch_axes) -> None:
  """Errors at start, naming the keys: eval batch sizes the mesh's batch axes cannot split."""
  e = config.eval
  if not e.path:
    return
  axes = "*".join("mesh." + a for a in batch_axes)
  n = math.prod(mesh.shape[a] for a in batch_axes)
  if int(e.batch_size) % n:
    raise ValueError(f"eval.batch_size={e.batch_size} is not divisible by {axes}={n}: each device "
                     f"embeds an equal share of the eval batch")
  a = attentive_config(config)
  if a["enabled"]:
    settings(a).validate("eval.attentive")
    probe_lib.check_batch_size(int(a["batch_size"]), mesh, batch_axes, "eval.attentive.batch_size")
    if not 0 < a["val_fraction"] < 1:
      raise ValueError(f"eval.attentive.val_fraction={a['val_fraction']} must be in (0, 1)")


def settings(a: dict) -> probe_lib.ProbeSettings:
  return probe_lib.ProbeSettings(lr=float(a["lr"]), min_lr=float(a["min_lr"]), batch_size=int(a["batch_size"]),
                                 epochs=int(a["epochs"]))


def split_by_class(labels: np.ndarray, sample_ids: np.ndarray, val_fraction: float) -> np.ndarray:
  """Boolean val mask: per class, the lowest-id share of its samples (probe_lib.per_class_split)."""
  return probe_lib.per_class_split(labels, val_fraction,
                                   lambda idx: idx[np.argsort(sample_ids[idx], kind="stable")])


class Evaluator:
  """Embeds eval.path with the encoder (sharded like training) and probes the embeddings."""

  def __init__(self, encoder, config, mesh, batch_axes):
    check_config(config, mesh, batch_axes)
    self.config, self.mesh, self.batch_axes = config, mesh, tuple(batch_axes)
    self.attentive = attentive_config(config)

    keep_tokens = self.attentive["enabled"]

    def embed(params, batch):
      out = encoder.apply({"params": params}, batch["patches"], batch["positions"], batch["segment_ids"])
      # Tokens leave the step only for the attentive probe: they are eval.tokens_per_row times larger.
      return out["pooled"][:, 0], out["last_hidden_state"] if keep_tokens else None
    self._embed = jax.jit(embed)

  def _pass(self, enc_params):
    e, i = self.config.eval, self.config.input
    stats = {}
    batches = input_pipeline.make_eval_batches(
        e.path, tokens_per_row=e.tokens_per_row, batch_size=e.batch_size, patch_size=i.patch_size,
        temporal_positions=i.temporal_positions, max_bad_fraction=i.max_bad_record_fraction, stats=stats)
    keep_tokens = self.attentive["enabled"]
    out = {k: [] for k in ("pooled", "tokens", "mask", "labels", "ids")}
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    for host_batch in batches:
      batch = global_arrays.global_batch(host_batch, self.mesh, self.batch_axes)
      with jax.set_mesh(self.mesh):
        pooled, tokens = self._embed(enc_params, batch)
      sid = gather(batch["sample_id"])[:, 0]
      keep = sid >= 0
      out["pooled"].append(gather(pooled)[keep])
      out["labels"].append(gather(batch["class_label"])[:, 0][keep])
      out["ids"].append(sid[keep])
      if keep_tokens:
        out["tokens"].append(gather(tokens)[keep])
        out["mask"].append(gather(batch["segment_ids"])[keep] > 0)
    cat = {k: np.concatenate(v) if v else None for k, v in out.items()}
    return cat, stats.get("skipped_records", 0)

  def __call__(self, enc_params) -> dict[str, float]:
    e = self.config.eval
    if not e.path:
      return {}
    d, skipped = self._pass(enc_params)
    labelled = d["labels"] >= 0
    result = {"skipped_records": float(skipped), "missing_labels": float(np.sum(~labelled))}
    if result["missing_labels"]:
      log.warning("eval.path %s: %d sample(s) without a class label skipped", e.path, int(result["missing_labels"]))
    emb, labels = d["pooled"][labelled], d["labels"][labelled]
    try:
      result["knn_top1"] = probes.knn_top1(emb, labels, k=e.knn_k)
      if e.linear_probe:
        report = {}
        result["linear_probe"] = probes.linear_probe_accuracy(emb, labels, report=report)
        result["dropped_classes"] = float(len(report["dropped_classes"]))
      if self.attentive["enabled"]:
        result.update(self._attentive(d, labelled))
    except probes.ProbeDataError as err:
      log.warning("eval.path %s: %s; the remaining probes are skipped", e.path, err)
    return result

  def _attentive(self, d, labelled) -> dict[str, float]:
    labels, ids = d["labels"][labelled], d["ids"][labelled]
    tokens, mask = d["tokens"][labelled], d["mask"][labelled]
    val = split_by_class(labels, ids, float(self.attentive["val_fraction"]))
    classes, y = np.unique(labels[~val], return_inverse=True)
    probes.check_probeable(labels[~val], "attentive probe (train split)")
    val_y = np.searchsorted(classes, labels[val]).astype(np.int32)
    res = probe_lib.run_probe(
        probe_lib.Features(tokens[~val], mask[~val], y.astype(np.int32)),
        probe_lib.Features(tokens[val], mask[val], val_y), len(classes), settings(self.attentive),
        mesh=self.mesh, batch_axes=self.batch_axes, batch_key="eval.attentive.batch_size")
    return {"attentive_top1": res["top1"], "attentive_top5": res["top5"]}
