"""Representation evaluation: embed a labelled held-out set, kNN top-1 (leave-one-out) and a linear probe."""
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_top1(embeddings: np.ndarray, labels: np.ndarray, k: int = 10, temperature: float = 0.07) -> float:
  """Leave-one-out kNN accuracy with similarity-weighted votes (as in DINO's kNN eval)."""
  if len(embeddings) != len(labels):
    raise ValueError(f"knn: {len(embeddings)} embeddings vs {len(labels)} labels")
  if len(labels) < 2:
    raise ValueError("knn: need at least 2 labelled samples")
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


def linear_probe_accuracy(embeddings: np.ndarray, labels: np.ndarray, folds: int = 3, seed: int = 0) -> float:
  """Mean cross-validated accuracy of an L2-regularised logistic regression on frozen embeddings."""
  x = l2_normalize(np.asarray(embeddings, np.float64))
  counts = np.unique(labels, return_counts=True)[1]
  folds = int(min(folds, counts.min()))
  if folds < 2:
    raise ValueError("linear probe: every class needs at least 2 samples")
  clf = LogisticRegression(max_iter=500, C=10.0, random_state=seed)
  return float(np.mean(cross_val_score(clf, x, labels, cv=folds)))
