"""Pooled embeddings of ArrayRecord samples by a workdir's encoder, as the folder `data_prep.cluster --embeddings` reads."""
import argparse
import json
import os

import jax
import ml_collections
import numpy as np

from ovenc_format import atomic_io
from ovenc_jax.train import checkpoint as ckpt_lib
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.model import encoder as model_lib

CONFIG_FILE = "config.json"


def save_config(workdir: str, config) -> str:
  """Writes WORKDIR/config.json (atomically) so tools can rebuild the model without the config file."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  atomic_io.atomic_write(path, lambda f: f.write(config.to_json(indent=1)), mode="w")
  return path


def read_model_section(workdir: str) -> tuple[str, dict | None]:
  """(path of WORKDIR/config.json, its 'model' section), or (path, None) when the file is absent."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return path, None
  with open(path) as f:
    cfg = json.load(f)
  if "model" not in cfg:
    raise KeyError(f"{path} has no 'model' section")
  return path, cfg["model"]


def load_model_config(workdir: str) -> ml_collections.ConfigDict:
  path, model = read_model_section(workdir)
  if model is None:
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  return ml_collections.ConfigDict(model)


def embed_records(workdir: str, records_dir: str, *, step: int | None = None, tokens_per_row: int = 1024,
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings [N, D] float32, sample_ids [N] int64) of every record, with the checkpoint's encoder."""
  model_cfg = load_model_config(workdir)
  encoder = model_lib.encoder_from_config(model_cfg)
  _, params = ckpt_lib.load_params(workdir, step)
  apply = jax.jit(lambda p, b: encoder.apply({"params": p}, b["patches"], b["positions"],
                                             b["segment_ids"])["pooled"][:, 0])
  embs, ids = [], []
  for batch in input_pipeline.make_eval_batches(records_dir, tokens_per_row=tokens_per_row,
                                                batch_size=batch_size, patch_size=model_cfg.patch_size,
                                                process_index=0, process_count=1):
    keep = batch["sample_id"][:, 0] >= 0
    e = np.asarray(apply(params["encoder"], {k: batch[k] for k in ("patches", "positions", "segment_ids")}))
    embs.append(e[keep].astype(np.float32))
    ids.append(batch["sample_id"][keep, 0].astype(np.int64))
  return np.concatenate(embs), np.concatenate(ids)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m ovenc_jax.eval.embed", description=__doc__)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--records", required=True)
  ap.add_argument("--output", required=True,
                  help="folder for embeddings.npy [N, D] float32 and sample_ids.npy [N] int64")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--tokens_per_row", type=int, default=1024)
  a = ap.parse_args(argv)
  emb, ids = embed_records(a.workdir, a.records, step=a.step, tokens_per_row=a.tokens_per_row)
  paths = atomic_io.write_embedding_folder(a.output, emb, ids, source=a.records)
  print("wrote " + ", ".join(paths.values()))


if __name__ == "__main__":
  main()
