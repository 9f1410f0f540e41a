"""Export a JAX checkpoint to a Hugging Face-ready PyTorch folder in the official OneVision-Encoder layout.

python -m ovenc_jax.interop.export_torch --workdir DIR [--step N] --output OUT [--with_centers] [--push_to_hub REPO_ID]

OUT holds config.json (with auto_map), model.safetensors, the transformers code beside them and a README.md
model card: transformers.AutoModel.from_pretrained(OUT, trust_remote_code=True) loads it.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Mapping

import numpy as np
from tqdm import tqdm

from ovenc_format import paths as pathio
from ovenc_jax.interop import torch_layout as layout_lib
from ovenc_jax.interop.hf import card as card_lib

_EXPORT_FILES = {layout_lib.MODEL_FILE, layout_lib.CONFIG_FILE, layout_lib.CENTERS_FILE, layout_lib.CARD_FILE,
                 *card_lib.CODE_FILES}
# numpy dtype name -> safetensors dtype tag (bfloat16 comes from ml_dtypes, named "bfloat16").
_ST_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "bfloat16": "BF16"}
# The keys of a workdir's config.json "model" section that fix parameter shapes, with the Arch field.
_SIZE_KEYS = {"width": "width", "depth": "depth", "num_heads": "num_heads", "mlp_dim": "mlp_dim",
              "patch_size": "patch_size"}


def _upload_dir(output: str, fill: Callable[[str], None]) -> None:
  """A remote OUTPUT (gs://): filled in a local temp dir, then each file uploaded atomically
  (paths.upload), config.json last: the file loaders look for first appears once the rest is there."""
  out = pathio.as_path(output)
  if out.is_file():
    raise FileExistsError(f"--output {output} exists and is not a directory")
  foreign = sorted({p.name for p in out.iterdir()} - _EXPORT_FILES) if out.is_dir() else []
  if foreign:
    raise FileExistsError(f"--output {output} holds files that are not from an export ({foreign[:5]}); "
                          "refusing to replace it")
  with tempfile.TemporaryDirectory(prefix="ovenc-export-") as tmp:
    fill(tmp)
    names = sorted(os.listdir(tmp), key=lambda n: (n == layout_lib.CONFIG_FILE, n))
    for name in names:
      pathio.upload(os.path.join(tmp, name), pathio.join(output, name))


def _write_dir_atomically(output: str, fill: Callable[[str], None]) -> None:
  """Fills a temp dir beside OUTPUT, then renames it into place (replacing an earlier export only)."""
  if pathio.is_remote(output):
    return _upload_dir(output, fill)
  output = os.path.abspath(output)
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(output):
    if not os.path.isdir(output):
      raise FileExistsError(f"--output {output} exists and is not a directory")
    foreign = sorted(set(os.listdir(output)) - _EXPORT_FILES)
    if foreign:
      raise FileExistsError(f"--output {output} holds files that are not from an export ({foreign[:5]}); "
                            "refusing to replace it")
  tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=parent)
  try:
    fill(tmp)
    if os.path.exists(output):
      # A directory cannot be renamed over a non-empty one: move the old export aside first, so a
      # reader sees either the old or the new complete directory, never a half-written one.
      old = tmp + ".old"
      os.rename(output, old)
      os.rename(tmp, output)
      shutil.rmtree(old)
    else:
      os.rename(tmp, output)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _save_safetensors(tensors: Mapping[str, np.ndarray], path: str, bar) -> None:
  """The safetensors format (8-byte header size, JSON header, raw little-endian data), written one tensor
  at a time so the progress bar follows the bytes; metadata format=pt, which transformers requires."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for key, a in tensors.items():
    if a.dtype.name not in _ST_DTYPES:
      raise layout_lib.LayoutError(f"{key} has dtype {a.dtype}, expected one of {sorted(_ST_DTYPES)}")
    header[key] = {"dtype": _ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                   "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for a in tensors.values():
      f.write(np.ascontiguousarray(a.byteswap().view(a.dtype.newbyteorder()) if a.dtype.byteorder == ">"
                                   else a).tobytes())
      bar.update(1)


def _progress(total: int):
  # Quiet in CI logs and pipes, where a redrawn bar is noise.
  return tqdm(total=total, desc="export", unit="tensor", file=sys.stderr,
              disable=not sys.stderr.isatty() or os.environ.get("CI") == "true")


def export_params(params: Mapping[str, Any], output: str, *, rope_layout: str = "official",
                  rope_theta: float = 10000.0, centers: Any = None, image_size: int = 224,
                  extra: Mapping[str, Any] | None = None, train_config: Mapping[str, Any] | None = None,
                  repo_id: str | None = None) -> dict[str, str]:
  """Writes OUTPUT/{config.json, model.safetensors[, centers.safetensors]}, the transformers code and
  README.md from the Encoder 'params' collection (or {"params": ...}); TRAIN_CONFIG (the workdir's
  config.json) fills the model card. Returns the written paths by file name."""
  if set(params) == {"params"}:
    params = params["params"]
  arch = layout_lib.arch_from_flax(params)
  state = layout_lib.flax_to_torch(params, arch)
  cfg = layout_lib.hf_config(arch, rope_layout=rope_layout, rope_theta=rope_theta, image_size=image_size,
                             extra=extra)
  centers_arr = None  # {safetensors key: array}: 'centers', or 'centers.<bank>' per bank of loss.heads
  if centers is not None:
    banks = centers if isinstance(centers, Mapping) else {None: centers}
    centers_arr = {}
    for name, c in banks.items():
      key = layout_lib.CENTERS_KEY if name is None else f"{layout_lib.CENTERS_KEY}.{name}"
      centers_arr[key] = np.ascontiguousarray(np.asarray(c))
      if centers_arr[key].ndim != 2 or centers_arr[key].shape[1] != arch.width or centers_arr[key].dtype.kind != "f":
        raise layout_lib.LayoutError(f"{key} has shape {centers_arr[key].shape} dtype {centers_arr[key].dtype}, "
                                     f"expected float [num_classes, {arch.width}]")

  if rope_layout == "consistent":
    print(f"warning: rope_layout=consistent: {output} gets model_type "
          f"{layout_lib.HF_MODEL_TYPES['consistent']!r}; the published OneVision-Encoder code pairs RoPE channels "
          "the official way and would compute other positions, so load it with the code shipped beside the "
          "weights (trust_remote_code=True) or ovenc_jax's OVEncoder", file=sys.stderr)
  fields = card_lib.card_fields(cfg, train_config, (extra or {}).get("step"),
                                sum(int(a.size) for a in state.values()), repo=repo_id)
  written = []

  def fill(tmp):
    with _progress(len(state) + len(centers_arr or {})) as bar:
      _save_safetensors(state, os.path.join(tmp, layout_lib.MODEL_FILE), bar)
      if centers_arr is not None:
        _save_safetensors(centers_arr, os.path.join(tmp, layout_lib.CENTERS_FILE), bar)
    with open(os.path.join(tmp, layout_lib.CONFIG_FILE), "w") as f:
      json.dump(cfg, f, indent=2)
      f.write("\n")
    written[:] = card_lib.write_hf_files(tmp, fields)

  _write_dir_atomically(output, fill)
  names = ([layout_lib.CONFIG_FILE, layout_lib.MODEL_FILE] +
           ([layout_lib.CENTERS_FILE] if centers_arr is not None else []) + written)
  return {name: pathio.join(pathio.absolute(output), name) for name in names}


def export_workdir(workdir: str, output: str, *, step: int | None = None, with_centers: bool = False,
                   rope_layout: str | None = None, image_size: int = 224,
                   repo_id: str | None = None) -> dict[str, str]:
  """Loads WORKDIR's checkpoint (latest or STEP) and exports it; the model config comes from
  WORKDIR/config.json when present, else the sizes are read off the parameter shapes."""
  from ovenc_jax.train import checkpoint as ckpt_lib  # jax/orbax only for the checkpoint path
  from ovenc_jax.eval import embed

  step, params = ckpt_lib.load_params(workdir, step)
  arch = layout_lib.arch_from_flax(params["encoder"])
  cfg_path, model_cfg = embed.read_model_section(workdir)
  rope_theta = 10000.0
  if model_cfg is not None:
    for key, field in _SIZE_KEYS.items():
      if key in model_cfg and int(model_cfg[key]) != getattr(arch, field):
        raise layout_lib.LayoutError(f"{cfg_path}: model.{key}={model_cfg[key]} but the checkpoint of step "
                                     f"{step} has {field}={getattr(arch, field)}")
    cfg_layout = model_cfg.get("rope_layout", "official")
    if rope_layout is not None and rope_layout != cfg_layout:
      raise layout_lib.LayoutError(f"--rope_layout={rope_layout} contradicts model.rope_layout={cfg_layout!r} "
                                   f"in {cfg_path}")
    rope_layout = cfg_layout
    rope_theta = float(model_cfg.get("rope_theta", rope_theta))
  elif rope_layout is None:
    rope_layout = "official"
    print(f"note: {cfg_path} not found; sizes read from the parameter shapes, rope_layout='official' "
          "(pass --rope_layout to change)", file=sys.stderr)
  centers = None
  if with_centers:
    if "centers" not in params:
      raise KeyError(f"--with_centers: the checkpoint of step {step} in {workdir} has no params/centers")
    centers = params["centers"]
  extra = {"step": int(step)}  # provenance only; no local paths in a file meant for sharing
  if model_cfg is not None and "variant" in model_cfg:
    extra["variant"] = model_cfg["variant"]
  train_config = None
  if model_cfg is not None:  # read_model_section has parsed it already
    train_config = json.loads(pathio.as_path(cfg_path).read_text())
  return export_params(params["encoder"], output, rope_layout=rope_layout, rope_theta=rope_theta,
                       centers=centers, image_size=image_size, extra=extra, train_config=train_config,
                       repo_id=repo_id)


def push_to_hub(folder: str, repo_id: str) -> str:
  """Uploads an export folder to the Hugging Face Hub model repo REPO_ID (created if missing)."""
  from huggingface_hub import HfApi  # only for this optional step

  api = HfApi()
  api.create_repo(repo_id, repo_type="model", exist_ok=True)
  api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                    commit_message="Upload OneVision-Encoder export from ovenc-jax")
  return f"https://huggingface.co/{repo_id}"


def main(argv=None) -> dict[str, str]:
  ap = argparse.ArgumentParser(prog="python -m ovenc_jax.interop.export_torch", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="training workdir (its checkpoints/ and config.json)")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--output", required=True, help="export directory (created or replaced)")
  ap.add_argument("--with_centers", action="store_true", help="also write centers.safetensors")
  ap.add_argument("--rope_layout", choices=layout_lib.ROPE_LAYOUTS, default=None,
                  help="only for a workdir without config.json (default official)")
  ap.add_argument("--image_size", type=int, default=224, help="config.json image_size (informational)")
  ap.add_argument("--push_to_hub", metavar="REPO_ID", default=None,
                  help="then upload OUT to this Hugging Face Hub model repo (needs a login or HF_TOKEN)")
  args = ap.parse_args(argv)
  if args.push_to_hub is not None and args.push_to_hub.count("/") != 1:
    ap.error(f"--push_to_hub {args.push_to_hub!r}: expected a repo id of the form OWNER/NAME")
  try:
    paths = export_workdir(args.workdir, args.output, step=args.step, with_centers=args.with_centers,
                           rope_layout=args.rope_layout, image_size=args.image_size, repo_id=args.push_to_hub)
  except (layout_lib.LayoutError, FileNotFoundError, FileExistsError, KeyError) as e:
    raise SystemExit(f"{ap.prog}: error: {e.args[0] if isinstance(e, KeyError) else e}") from e
  for path in paths.values():
    print(f"wrote {path}")
  if args.push_to_hub is not None:
    if pathio.is_remote(args.output):
      ap.error("--push_to_hub uploads a local --output folder")
    print(f"uploaded to {push_to_hub(os.path.abspath(args.output), args.push_to_hub)}")
  return paths


if __name__ == "__main__":
  main()
