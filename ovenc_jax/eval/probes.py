"""Representation evaluation: embed a labelled held-out set, kNN top-1 (leave-one-out) and a linear probe."""
import logging

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

log = logging.getLogger("ovenc_jax.eval.probes")


class ProbeDataError(ValueError):
  """The labelled set cannot be probed (no samples, one class): a message, not a crash, for callers."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def check_probeable(labels: np.ndarray, what: str) -> None:
  """ProbeDataError naming `what` when the set has no samples or a single class."""
  classes = np.unique(labels)
  if len(labels) == 0:
    raise ProbeDataError(f"{what}: the eval set has no labelled samples")
  if len(classes) < 2:
    raise ProbeDataError(f"{what}: the eval set has one class ({classes[0]}) in {len(labels)} samples; "
                         f"a probe needs at least 2")


def drop_rare_classes(labels: np.ndarray, min_count: int = 2) -> tuple[np.ndarray, dict[int, int]]:
  """(mask of samples whose class has >= min_count samples, {dropped class: its count})."""
  classes, counts = np.unique(labels, return_counts=True)
  rare = {int(c): int(n) for c, n in zip(classes, counts) if n < min_count}
  if rare:
    log.warning("%d class(es) with fewer than %d samples left out of the probe: %s", len(rare), min_count,
                ", ".join(f"{c} ({n})" for c, n in sorted(rare.items())[:20]))
  return ~np.isin(labels, list(rare)), rare


def knn_top1(embeddings: np.ndarray, labels: np.ndarray, k: int = 10, temperature: float = 0.07) -> float:
  """Leave-one-out kNN accuracy with similarity-weighted votes (as in DINO's kNN eval)."""
  if len(embeddings) != len(labels):
    raise ValueError(f"knn: {len(embeddings)} embeddings vs {len(labels)} labels")
  check_probeable(np.asarray(labels), "knn")
  x = l2_normalize(np.asarray(embeddings, np.float64))
  labels = np.asarray(labels)
  classes, y = np.unique(labels, return_inverse=True)
  k = min(k, len(x) - 1)
  correct = 0
  for start in range(0, len(x), 1024):
    sims = x[start:start + 1024] @ x.T
    rows = np.arange(sims.shape[0])
    sims[rows, start + rows] = -np.inf  # leave the query itself out
    nn_idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    nn_sim = np.take_along_axis(sims, nn_idx, 1)
    votes = np.zeros((sims.shape[0], len(classes)))
    np.add.at(votes, (rows[:, None].repeat(k, 1), y[nn_idx]), np.exp(nn_sim / temperature))
    correct += int(np.sum(votes.argmax(1) == y[start:start + sims.shape[0]]))
  return correct / len(x)


def linear_probe_accuracy(embeddings: np.ndarray, labels: np.ndarray, folds: int = 3, seed: int = 0,
                          report: dict | None = None) -> float:
  """Mean cross-validated accuracy of an L2-regularised logistic regression on frozen embeddings.

  Classes with a single sample cannot be split into folds: they are left out, logged and listed in
  `report["dropped_classes"]` when a dict is given."""
  labels = np.asarray(labels)
  check_probeable(labels, "linear probe")
  keep, rare = drop_rare_classes(labels)
  if report is not None:
    report["dropped_classes"] = rare
  x, labels = l2_normalize(np.asarray(embeddings, np.float64))[keep], labels[keep]
  check_probeable(labels, "linear probe (classes with >= 2 samples)")
  folds = int(min(folds, np.unique(labels, return_counts=True)[1].min()))
  clf = LogisticRegression(max_iter=500, C=10.0, random_state=seed)
  return float(np.mean(cross_val_score(clf, x, labels, cv=folds)))


def fit_linear_top1(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                    seed: int = 0) -> tuple[float, float]:
  """(top-1, top-5) on val of a logistic regression fitted on train (mean-pooled, L2-normalised)."""
  check_probeable(np.asarray(train_y), "linear probe (train split)")
  if len(val_y) == 0:
    raise ProbeDataError("linear probe: the validation split has no labelled samples")
  clf = LogisticRegression(max_iter=1000, C=10.0, random_state=seed)
  clf.fit(l2_normalize(np.asarray(train_x, np.float64)), train_y)
  prob = clf.predict_proba(l2_normalize(np.asarray(val_x, np.float64)))
  top = clf.classes_[np.argsort(-prob, axis=1, kind="stable")[:, :5]]
  val_y = np.asarray(val_y)
  return float(np.mean(top[:, 0] == val_y)), float(np.mean((top == val_y[:, None]).any(1)))


def fit_knn_top1(train_x, train_y, val_x, val_y, k: int = 10, temperature: float = 0.07) -> float:
  """kNN top-1 of val against the train split (similarity-weighted votes)."""
  check_probeable(np.asarray(train_y), "knn (train split)")
  if len(val_y) == 0:
    raise ProbeDataError("knn: the validation split has no labelled samples")
  tx, vx = l2_normalize(np.asarray(train_x, np.float64)), l2_normalize(np.asarray(val_x, np.float64))
  classes, y = np.unique(train_y, return_inverse=True)
  k = min(k, len(tx))
  sims = vx @ tx.T
  idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  votes = np.zeros((len(vx), len(classes)))
  np.add.at(votes, (np.arange(len(vx))[:, None].repeat(k, 1), y[idx]),
            np.exp(np.take_along_axis(sims, idx, 1) / temperature))
  return float(np.mean(classes[votes.argmax(1)] == np.asarray(val_y)))
