"""Labelled video sets (a folder per class, or a CSV `path,label`) -> the input list and --class_labels JSON of codec_patchify.

python -m data_prep.video_labels --folder ROOT/train --output OUT/train
python -m data_prep.video_labels --csv val.csv --root VIDEOS --output OUT/val --classes OUT/train/classes.json
OUT/x gets inputs.txt (one absolute path a line), class_labels.json ({path: class index}) and
classes.json (class names; index = label). Give val the train's classes.json so indices agree.
Any of these may be gs:// paths (listed and written through ovenc_format.paths).
"""
import argparse
import csv
import io
import json
import os

from data_prep.codec_patchify import MEDIA_EXTENSIONS
from ovenc_format import atomic_io
from ovenc_format import paths as pathio


def _is_media(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in MEDIA_EXTENSIONS


def _canonical(path: str) -> str:
  """As codec_patchify's ids: local paths absolute with links resolved, URLs as written."""
  return path if pathio.is_remote(path) else os.path.realpath(path)


def _read(path: str, flag: str) -> str:
  try:
    return pathio.as_path(path).read_text()
  except Exception as e:  # gcsfs' errors name the API URL, not the path
    raise ValueError(f"{flag} {path!r}: cannot read ({type(e).__name__})") from e


def from_folder(root: str) -> list[tuple[str, str]]:
  """(video path, class name) for each media file under ROOT/<class>/ (any depth below the class)."""
  if not pathio.is_dir(root):
    raise ValueError(f"--folder {root!r} is not a directory")
  out = []
  for cls in sorted(p.name for p in pathio.as_path(root).iterdir() if p.is_dir()):
    out += [(f, cls) for f in pathio.walk_files(pathio.join(root, cls)) if _is_media(f)]
  if not out:
    raise ValueError(f"--folder {root!r}: no media files in class sub-folders")
  return out


def from_csv(path: str, root: str = "") -> list[tuple[str, str]]:
  """(video path, label) rows of a CSV `path,label` (a header row `path,label` is skipped; spaces
  also separate, as in the published lists). Relative paths join --root, else the CSV's folder."""
  base = root or (path.rsplit("/", 1)[0] if pathio.is_remote(path) else os.path.dirname(os.path.abspath(path)))
  out = []
  text = _read(path, "--csv")
  for i, row in enumerate(csv.reader(io.StringIO(text, newline=""))):
    if len(row) == 1:
      row = row[0].split()
    row = [c.strip() for c in row]
    if not row or not row[0] or row[0].startswith("#"):
      continue
    if len(row) != 2:
      raise ValueError(f"--csv {path!r} line {i + 1}: expected `path,label`, got {row!r}")
    if i == 0 and row[0].lower() == "path":
      continue
    absolute = os.path.isabs(row[0]) or pathio.is_remote(row[0])
    out.append((row[0] if absolute else pathio.join(base, row[0]), row[1]))
  if not out:
    raise ValueError(f"--csv {path!r}: no rows")
  return out


def label_index(rows, classes: list[str] | None) -> tuple[dict[str, int], list[str]]:
  """{absolute path: class index}, class names. Names are sorted (integer labels numerically)
  unless `classes` fixes them; a label outside given classes is an error naming it."""
  names = sorted({c for _, c in rows}, key=lambda c: (0, int(c), "") if c.lstrip("-").isdigit() else (1, 0, c))
  if classes is None:
    classes = names
  index = {c: i for i, c in enumerate(classes)}
  unknown = sorted(set(names) - set(index))
  if unknown:
    raise ValueError(f"--classes: labels {unknown[:5]} are not among its {len(classes)} classes")
  return {_canonical(p): index[c] for p, c in rows}, list(classes)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m data_prep.video_labels", description=__doc__, allow_abbrev=False,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--folder", help="ROOT with one sub-folder of videos per class")
  src.add_argument("--csv", help="CSV of `path,label` rows")
  ap.add_argument("--root", default="", help="folder that relative CSV paths are under (default: the CSV's)")
  ap.add_argument("--classes", default="", help="classes.json of another split, to share its indices")
  ap.add_argument("--output", required=True)
  a = ap.parse_args(argv)
  try:
    rows = from_folder(a.folder) if a.folder else from_csv(a.csv, a.root)
    classes = None
    if a.classes:
      classes = json.loads(_read(a.classes, "--classes"))
    labels, classes = label_index(rows, classes)
  except (OSError, ValueError) as e:
    ap.error(str(e))
  pathio.makedirs(a.output)
  paths = sorted(labels)
  atomic_io.atomic_write(pathio.join(a.output, "inputs.txt"), lambda f: f.write("\n".join(paths) + "\n"), mode="w")
  atomic_io.save_json(pathio.join(a.output, "class_labels.json"), labels)
  atomic_io.save_json(pathio.join(a.output, "classes.json"), classes)
  print(f"{len(paths)} videos in {len(classes)} classes -> {a.output}/inputs.txt, class_labels.json, classes.json")


if __name__ == "__main__":
  main()
