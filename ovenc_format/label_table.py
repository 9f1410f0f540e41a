"""Label side table: sample_id -> top-k concept labels, written atomically as one .npz, joined by sample_id."""
import os

import numpy as np

from ovenc_format import atomic_io
from ovenc_format import paths

FORMAT_VERSION = 1
FILE_NAME = "labels.npz"
# Arrays in the .npz (sorted by sample_id, one row per sample):
#   sample_id   int64   [N]     unique, ascending (so joins are a binary search)
#   labels      int32   [N, K]  concept ids in [0, num_classes), nearest first; -1 = padding
#   cosine      float32 [N, K]  cosine to each label's center (nan where labels == -1)
#   num_classes int64   []      number of centers the ids index
#   format_version int64 []


def _resolve(path) -> str:
  path = os.fspath(path)
  return paths.join(path, FILE_NAME) if paths.is_dir(path) else path


def write_label_table(path, sample_ids, labels, num_classes: int, cosine=None) -> str:
  """Validates and writes the table (rows sorted by sample_id) via temp file + rename; returns the path."""
  ids = np.asarray(sample_ids)
  lab = np.asarray(labels)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"label table: sample_id must be a 1-D integer array, got {ids.dtype} {ids.shape}")
  if lab.ndim != 2 or lab.shape[0] != ids.shape[0] or not np.issubdtype(lab.dtype, np.integer):
    raise ValueError(f"label table: labels must be an integer [N={ids.shape[0]}, K] array, got "
                     f"{lab.dtype} {lab.shape}")
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"label table: num_classes must be a positive int, got {num_classes!r}")
  if ids.size and ids.min() < 0:
    raise ValueError("label table: sample_id values must be >= 0")
  if lab.size and (lab.min() < -1 or lab.max() >= num_classes):
    raise ValueError(f"label table: labels must be in [0, {num_classes}) or -1, got range "
                     f"[{lab.min()}, {lab.max()}]")
  order = np.argsort(ids, kind="stable")
  ids = ids[order].astype(np.int64)
  dup = ids[1:][ids[1:] == ids[:-1]]
  if dup.size:
    raise ValueError(f"label table: duplicate sample_id(s), e.g. {dup[:5].tolist()}")
  if cosine is None:
    cos = np.full(lab.shape, np.nan, np.float32)
  else:
    cos = np.asarray(cosine, np.float32)
    if cos.shape != lab.shape:
      raise ValueError(f"label table: cosine shape {cos.shape} != labels shape {lab.shape}")
  path = _resolve(path)
  return atomic_io.save_npz(path, sample_id=ids, labels=lab[order].astype(np.int32), cosine=cos[order],
                            num_classes=np.int64(num_classes), format_version=np.int64(FORMAT_VERSION))


class LabelTable:
  """Loaded side table with an array join: lookup(sample_ids) -> labels [n, K]."""

  def __init__(self, path):
    self.path = _resolve(path)
    if not paths.exists(self.path):
      raise FileNotFoundError(f"label table {self.path} does not exist (run data_prep.cluster first)")
    try:
      # A remote table is staged to this host's cache first (np.load wants a seekable local file).
      with np.load(paths.stage(self.path), allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    except Exception as e:  # zip/npy errors come in several types
      raise ValueError(f"label table {self.path}: not a readable .npz ({type(e).__name__}: {e})") from e
    need = ("sample_id", "labels", "cosine", "num_classes", "format_version")
    missing = [k for k in need if k not in data]
    if missing:
      raise ValueError(f"label table {self.path}: missing array(s) {missing}")
    if int(data["format_version"]) != FORMAT_VERSION:
      raise ValueError(f"label table {self.path}: field 'format_version' is {int(data['format_version'])}, "
                       f"this reader reads {FORMAT_VERSION}")
    ids, lab = data["sample_id"], data["labels"]
    if ids.dtype != np.int64 or ids.ndim != 1:
      raise ValueError(f"label table {self.path}: field 'sample_id' must be int64 [N], got {ids.dtype} {ids.shape}")
    if lab.dtype != np.int32 or lab.ndim != 2 or lab.shape[0] != ids.shape[0]:
      raise ValueError(f"label table {self.path}: field 'labels' must be int32 [N, K], got {lab.dtype} {lab.shape}")
    if ids.size > 1 and not (np.diff(ids) > 0).all():
      raise ValueError(f"label table {self.path}: field 'sample_id' is not strictly ascending")
    self.sample_ids, self.labels, self.cosine = ids, lab, data["cosine"]
    self.num_classes = int(data["num_classes"])
    if lab.size and (lab.min() < -1 or lab.max() >= self.num_classes):
      raise ValueError(f"label table {self.path}: field 'labels' outside [-1, {self.num_classes})")

  def __len__(self):
    return self.sample_ids.shape[0]

  @property
  def top_k(self) -> int:
    return self.labels.shape[1]

  def lookup(self, sample_ids, missing: str = "error") -> np.ndarray:
    """Labels [n, K] for sample_ids; missing='error' raises on unknown ids, 'pad' gives -1 rows."""
    if missing not in ("error", "pad"):
      raise ValueError(f"lookup: missing must be 'error' or 'pad', got {missing!r}")
    q = np.asarray(sample_ids, np.int64).reshape(-1)
    pos = np.searchsorted(self.sample_ids, q)
    pos_c = np.minimum(pos, max(len(self) - 1, 0))
    found = (pos < len(self)) & (self.sample_ids[pos_c] == q) if len(self) else np.zeros(q.shape, bool)
    if missing == "error" and not found.all():
      raise KeyError(f"label table {self.path}: {int((~found).sum())} sample_id(s) not in the table, "
                     f"e.g. {q[~found][:5].tolist()}")
    out = np.full((q.shape[0], self.top_k), -1, np.int32)
    out[found] = self.labels[pos_c[found]]
    return out


def load_label_table(path) -> dict:
  """dict sample_id -> labels int32 [K] (convenient for small tables; use LabelTable for joins)."""
  t = LabelTable(path)
  return {int(i): row for i, row in zip(t.sample_ids, t.labels)}
