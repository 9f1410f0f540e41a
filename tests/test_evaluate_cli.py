"""python -m ovenc_jax.evaluate on digit record folders: results table, feature cache, export folders; trained vs initial."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from ovenc_jax import evaluate
from ovenc_jax.configs import pretrain
from ovenc_jax.eval import attentive_probe as probe_lib
from ovenc_jax.eval import embed as embed_lib
from ovenc_jax.eval import probes
from ovenc_jax.eval import token_features
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import checkpoint as ckpt_lib
from tests.helpers import digit_shards


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  root = tmp_path_factory.mktemp("probe")
  return (digit_shards.write_digit_shards(str(root / "train"), 0, 120, num_shards=2),
          digit_shards.write_digit_shards(str(root / "val"), 1000, 48, num_shards=2, seed=1))


def _init_workdir(path):
  """A workdir holding the tiny model's initial params (as import_torch writes one)."""
  cfg = pretrain.get_config("variant=tiny")
  enc = model_lib.encoder_from_config(cfg.model)
  x = (np.zeros((1, 8, 588), np.uint8), np.zeros((1, 8, 3), np.int32), np.ones((1, 8), np.int32))
  params = nn.meta.unbox(jax.jit(enc.init)(jax.random.key(0), *x)["params"])
  ckpt_lib.write_params_checkpoint(path, {"encoder": params}, 0)
  embed_lib.save_config(path, cfg)
  return enc, params


def _knn_reference(tx, ty, vx, vy, k=10, temperature=0.07):
  """Brute-force weighted kNN, one query at a time."""
  tx = tx / np.linalg.norm(tx, axis=1, keepdims=True)
  correct = 0
  for x, y in zip(vx, vy):
    sims = tx @ (x / np.linalg.norm(x))
    nn = np.argsort(-sims, kind="stable")[:k]
    votes = {}
    for i in nn:
      votes[ty[i]] = votes.get(ty[i], 0.0) + np.exp(sims[i] / temperature)
    correct += max(votes, key=votes.get) == y
  return correct / len(vy)


@pytest.mark.slow
def test_cli_writes_results_reuses_features_and_matches_references(splits, tmp_path):
  wd, out = str(tmp_path / "wd"), str(tmp_path / "out")
  enc, params = _init_workdir(wd)
  argv = ["--model", wd, "--train", splits[0], "--val", splits[1], "--output", out, "--probe", "attentive",
          "--probe", "linear", "--probe", "knn", "--tokens_per_row", "32", "--batch_size", "16",
          "--epochs", "2", "--probe_batch_size", "16", "--dataset", "digits"]
  rows = evaluate.main(argv)
  assert [r["probe"] for r in rows] == ["attentive", "linear", "knn"]
  got = json.load(open(os.path.join(out, "results.json")))
  assert got[0]["dataset"] == "digits" and got[0]["train_clips"] == 120 and got[0]["val_clips"] == 48
  assert 1 <= got[0]["frames"] <= 1 and 5 < got[0]["tokens"] <= 25
  md = open(os.path.join(out, "results.md")).read()
  assert "| dataset | frames | tokens | probe | lr | top-1 | top-5 |" in md and "| digits |" in md
  # The cache holds the encoder's tokens: the same as applying it directly to the records.
  tr = token_features.load(os.path.join(out, "features", "train"))
  stats = token_features.ReadStats()
  rows_ = list(token_features.labelled_rows(splits[0], patch_size=14, tokens_per_row=32, stats=stats))[:4]
  ref = np.asarray(enc.apply({"params": params}, np.stack([r["patches"] for r in rows_]),
                             np.stack([r["positions"] for r in rows_]),
                             np.stack([r["segment_ids"] for r in rows_]))["last_hidden_state"])
  np.testing.assert_allclose(np.asarray(tr.tokens[np.arange(4)], np.float32), ref, rtol=1e-2, atol=1e-2)
  np.testing.assert_array_equal(tr.mask[np.arange(4)], np.stack([r["segment_ids"] for r in rows_]) > 0)
  va = token_features.load(os.path.join(out, "features", "val"))
  want = _knn_reference(token_features.pooled(tr), np.asarray(tr.labels), token_features.pooled(va),
                        np.asarray(va.labels))
  assert rows[2]["top1"] == pytest.approx(want)
  # The same weights exported to the PyTorch/HF layout and read back through import_torch: the same numbers.
  from ovenc_jax.interop import export_torch
  export_torch.export_workdir(wd, str(tmp_path / "export"))
  exported = evaluate.main(["--model", str(tmp_path / "export"), "--temporal_positions", "sample_index",
                            "--output", str(tmp_path / "out_export")] + argv[2:6] + argv[8:])
  assert [r["top1"] for r in exported] == [r["top1"] for r in rows]
  # An lr sweep on the cached features: the encoder does not run again, the first lr repeats its number.
  os.rename(os.path.join(wd, "checkpoints"), os.path.join(wd, "moved"))
  again = evaluate.main(argv[:8] + ["--epochs", "2", "--probe_batch_size", "16", "--reuse_features",
                                    "--lr", "1e-4", "1e-3"])
  assert [r["lr"] for r in again] == [1e-4, 1e-3]
  assert again[0]["top1"] == rows[0]["top1"] and again[0]["train_loss"] == rows[0]["train_loss"]
  # --select_lr: one row, its lr the best on a holdout of --train, then fit on all of --train as the sweep did.
  picked = evaluate.main(argv[:8] + ["--epochs", "2", "--probe_batch_size", "16", "--reuse_features",
                                     "--lr", "1e-4", "1e-3", "--select_lr"])
  assert len(picked) == 1 and picked[0]["lr_selected_on"] == "train holdout"
  holdout = picked[0]["holdout_top1"]
  assert picked[0]["lr"] == max((1e-4, 1e-3), key=lambda lr: (holdout[str(lr)], -lr))
  assert picked[0]["top1"] == again[[r["lr"] for r in again].index(picked[0]["lr"])]["top1"]


def test_cli_refuses_one_class_and_bad_batch(splits, tmp_path):
  wd = str(tmp_path / "wd")
  _init_workdir(wd)
  recs = [digit_shards.digit_record(np.eye(8) * 16, 3, i, np.random.default_rng(i)) for i in range(6)]
  one = digit_shards.write_shards(str(tmp_path / "one"), recs, num_shards=1)
  with pytest.raises(SystemExit):
    evaluate.main(["--model", wd, "--train", one, "--val", splits[1], "--output", str(tmp_path / "o"),
                   "--tokens_per_row", "32", "--batch_size", "8"])
  # The features the failed run cached: the encoder does not run again.
  args = evaluate.parser().parse_args(["--model", wd, "--train", one, "--val", splits[1], "--output",
                                       str(tmp_path / "o"), "--tokens_per_row", "32", "--batch_size", "8",
                                       "--reuse_features"])
  args.probe = ["attentive"]
  with pytest.raises(ValueError, match=r"one class \(3\)"):
    evaluate.run(args)
  args.batch_size, args.reuse_features = 12, False
  with pytest.raises(ValueError, match=r"--batch_size=12 is not divisible by the 8 devices"):
    evaluate.run(args)


@pytest.mark.slow
def test_attentive_probe_on_trained_beats_initial(trained_digits, tmp_path):
  encoder = trained_digits["encoder"]
  splits = (digit_shards.write_digit_shards(str(tmp_path / "train"), 1000, 300, num_shards=2, seed=1),
            digit_shards.write_digit_shards(str(tmp_path / "val"), 1300, 200, num_shards=2, seed=2))
  out = {}
  mesh = jax.make_mesh((8,), ("data",))
  s = probe_lib.ProbeSettings()  # the published protocol: lr 1e-4, 30 epochs on a set this small, batch 32
  for name in ("initial", "final"):
    f = {k: token_features.extract(encoder, trained_digits[name], p, patch_size=14, tokens_per_row=32,
                                   batch_size=16, mesh=mesh)[0] for k, p in zip(("train", "val"), splits)}
    out[f"attentive_{name}"] = probe_lib.run_probe(f["train"], f["val"], 10, s, mesh=mesh)["top1"]
    out[f"linear_{name}"] = probes.fit_linear_top1(token_features.pooled(f["train"]), f["train"].labels,
                                                   token_features.pooled(f["val"]), f["val"].labels)[0]
  print(out)
  assert out["attentive_final"] > out["attentive_initial"] + 0.15, out
  # Matches the mean-pool linear probe within a few of the 200 validation clips.
  assert out["attentive_final"] >= out["linear_final"] - 0.03, out


def test_video_labels_from_folder_and_csv_share_class_indices(tmp_path):
  from data_prep import codec_patchify
  from data_prep import video_labels
  for cls, names in (("walk", ["a.mp4", "b.avi"]), ("run", ["c.mp4"])):
    (tmp_path / "train" / cls).mkdir(parents=True)
    for n in names:
      (tmp_path / "train" / cls / n).write_bytes(b"")
  (tmp_path / "train" / "run" / "notes.txt").write_text("")
  video_labels.main(["--folder", str(tmp_path / "train"), "--output", str(tmp_path / "out_train")])
  classes = json.load(open(tmp_path / "out_train" / "classes.json"))
  assert classes == ["run", "walk"]
  labels = codec_patchify.load_class_labels(str(tmp_path / "out_train" / "class_labels.json"))
  assert labels == {str(tmp_path / "train" / "walk" / "a.mp4"): 1, str(tmp_path / "train" / "walk" / "b.avi"): 1,
                    str(tmp_path / "train" / "run" / "c.mp4"): 0}
  assert codec_patchify.expand_inputs([str(tmp_path / "out_train" / "inputs.txt")]) == sorted(labels)
  (tmp_path / "val.csv").write_text("path,label\nv/x.mp4,walk\nv/y.mp4 run\n")
  video_labels.main(["--csv", str(tmp_path / "val.csv"), "--output", str(tmp_path / "out_val"),
                     "--classes", str(tmp_path / "out_train" / "classes.json")])
  val = json.load(open(tmp_path / "out_val" / "class_labels.json"))
  assert val == {str(tmp_path / "v" / "x.mp4"): 1, str(tmp_path / "v" / "y.mp4"): 0}
  (tmp_path / "bad.csv").write_text("v/z.mp4,jump\n")
  with pytest.raises(SystemExit):
    video_labels.main(["--csv", str(tmp_path / "bad.csv"), "--output", str(tmp_path / "o"),
                       "--classes", str(tmp_path / "out_train" / "classes.json")])
