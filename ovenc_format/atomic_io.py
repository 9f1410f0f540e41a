"""Atomic file writes (temp file in the same folder, then rename) for the offline jobs' outputs."""
import json
import os
import tempfile

import numpy as np

from ovenc_format import paths as pathio


def atomic_write(path: str, write, mode: str = "wb") -> str:
  """Calls write(f) on a temp file beside `path`, then renames it over `path`: readers never see a
  half-written file, and a crash leaves only a dot-temp file behind. A remote `path` (gs://...) is
  written to a local temp file first, then uploaded the same way (pathio.upload)."""
  if pathio.is_remote(path):
    with tempfile.TemporaryDirectory(prefix="ovenc-upload-") as d:
      local = atomic_write(os.path.join(d, os.path.basename(os.fspath(path))), write, mode)
      pathio.upload(local, path)
    return path
  return pathio.write_local(path, write, mode)


def save_npy(path: str, arr) -> str:
  return atomic_write(path, lambda f: np.save(f, arr))


def save_npz(path: str, **arrays) -> str:
  return atomic_write(path, lambda f: np.savez(f, **arrays))


def save_json(path: str, obj) -> str:
  return atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


def write_embedding_folder(output_dir: str, embeddings, sample_ids, source: str | None = None,
                           **teacher_arrays) -> dict[str, str]:
  """The folder `data_prep.cluster --embeddings` reads: embeddings.npy [N, D], sample_ids.npy [N] and,
  when given, teacher.npz (what a teacher needs to embed further records the same way). Duplicate
  sample ids (records repeated across shards) raise, naming `source`, before anything is written."""
  s = np.sort(np.asarray(sample_ids))
  dup = s[1:][s[1:] == s[:-1]]
  if dup.size:
    raise ValueError(f"{source or output_dir}: duplicate sample_id(s) across records, e.g. {dup[:5].tolist()}")
  paths = dict(embeddings=save_npy(pathio.join(output_dir, "embeddings.npy"), embeddings),
               sample_ids=save_npy(pathio.join(output_dir, "sample_ids.npy"), sample_ids))
  if teacher_arrays:
    paths["teacher"] = save_npz(pathio.join(output_dir, "teacher.npz"), **teacher_arrays)
  return paths
