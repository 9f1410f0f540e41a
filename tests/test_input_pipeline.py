"""Input pipeline: resume, packing, per-process shards, mixing, flips, truncation, global arrays, config errors, eval batches."""
import os
import subprocess
import sys

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers import digit_shards
from ovenc_format import label_table
from ovenc_format import records
from ovenc_jax.input import defaults
from ovenc_jax.input import features
from ovenc_jax.input import global_arrays
from ovenc_jax.input import pipeline as ip

PATCH = 4
GRID = (2, 5, 6)


def make_record(rng, source, index, k_lo, k_hi, grid=GRID):
  """A random sparse token set: K sorted unique (t, h, w) of the grid, random pixels and labels."""
  t, h, w = grid
  k = int(rng.integers(k_lo, k_hi + 1))
  flat = np.sort(rng.choice(t * h * w, k, replace=False))
  path = f"{source}/{index:04d}"
  return dict(
      patches=rng.integers(0, 256, (k, PATCH, PATCH, 3), dtype=np.uint8),
      positions=np.stack(np.unravel_index(flat, grid), -1).astype(np.int32),
      grid=np.array(grid, np.int32), frame_types="I" * t, source=path,
      sample_id=records.sample_id_for(path),
      labels=rng.integers(0, 1000, int(rng.integers(0, 5))).astype(np.int32),
      signal="image", class_label=int(rng.integers(-1, 10)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("shards")
  rng = np.random.default_rng(0)
  sets = {
      "a": ([make_record(rng, "a", i, 3, 40) for i in range(60)], 3),
      "b": ([make_record(rng, "b", i, 3, 40) for i in range(24)], 2),
      "long": ([make_record(rng, "long", i, 50, 60) for i in range(6)], 1),
      "c": ([make_record(rng, "c", i, 3, 20) for i in range(13)], 2),
  }
  out = {}
  for name, (recs, n) in sets.items():
    d = digit_shards.write_shards(root / name, recs, n)
    # The reference is read back through the record module's own reader, not the pipeline.
    out[name] = (d, {r["sample_id"]: r for r in records.read_all(d)})
  return out


def config(sources, **kw):
  cfg = defaults.default_input_config()
  cfg.update(sources=[{"path": p, "weight": w} for p, w in sources], global_batch_size=4,
             tokens_per_row=48, max_segments=3, patch_size=PATCH, max_labels=3, seed=7)
  cfg.update(kw)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def flat_tokens(rec):
  return rec["patches"].reshape(len(rec["patches"]), -1)


def check_row_segments(batch, refs, n_tok):
  """Every segment equals one record's tokens and row features; empty slots and padding are blank."""
  seen = []
  for r in range(batch["patches"].shape[0]):
    seg = batch["segment_ids"][r]
    sids = batch["sample_id"][r]
    n = int((sids >= 0).sum())
    assert (sids[:n] >= 0).all() and (sids[n:] == -1).all()
    assert set(np.unique(seg)) - {0} == set(range(1, n + 1))
    used = 0
    for k in range(1, n + 1):
      ref = refs[int(sids[k - 1])]
      mask = seg == k
      np.testing.assert_array_equal(batch["patches"][r][mask], flat_tokens(ref))
      np.testing.assert_array_equal(batch["positions"][r][mask], ref["positions"])
      want = np.full(batch["labels"].shape[-1], -1)
      lab = ref["labels"][:want.size]
      want[:lab.size] = lab
      np.testing.assert_array_equal(batch["labels"][r, k - 1], want)
      assert batch["class_label"][r, k - 1] == ref["class_label"]
      used += int(mask.sum())
      seen.append(int(sids[k - 1]))
    assert (batch["labels"][r, n:] == -1).all() and (batch["class_label"][r, n:] == -1).all()
    pad = seg == 0
    assert pad.sum() == n_tok - used
    assert (batch["patches"][r][pad] == 0).all() and (batch["positions"][r][pad] == 0).all()
  return seen


# ---- resume -------------------------------------------------------------------------------------

def test_resume_is_exact_with_state_and_orbax(data, tmp_path):
  cfg = config([(data["a"][0], 3.0), (data["b"][0], 1.0), (data["long"][0], 1.0)], hflip=True)
  it = ip.make_train_iterator(cfg, process_index=0, process_count=1)
  first = take(it, 3)
  state = it.get_state()
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("ds",))
  mngr.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  cont = take(it, 5)

  again = ip.make_train_iterator(cfg, process_index=0, process_count=1)
  again.set_state(state)
  assert_batches_equal(cont, take(again, 5))

  fresh = ip.make_train_iterator(cfg, process_index=0, process_count=1)
  restored = mngr.restore(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(fresh)))["ds"]
  assert_batches_equal(cont, take(restored, 5))
  mngr.close()

  # Same seed replays; without restoring, a fresh iterator starts over (so the checks above can fail).
  replay = take(ip.make_train_iterator(cfg, process_index=0, process_count=1), 3)
  assert_batches_equal(first, replay)
  assert not np.array_equal(replay[0]["sample_id"], cont[0]["sample_id"])
  cfg.seed = 8
  other = next(ip.make_train_iterator(cfg, process_index=0, process_count=1))
  assert not np.array_equal(other["sample_id"], first[0]["sample_id"])


@pytest.mark.slow
def test_resume_is_exact_with_worker_processes(data):
  cfg = config([(data["a"][0], 3.0), (data["b"][0], 1.0)], hflip=True, worker_count=2)
  it = ip.make_train_iterator(cfg, process_index=0, process_count=1)
  take(it, 3)
  state = it.get_state()
  cont = take(it, 4)
  again = ip.make_train_iterator(cfg, process_index=0, process_count=1)
  again.set_state(state)
  assert_batches_equal(cont, take(again, 4))
  ids = np.concatenate([b["sample_id"].ravel() for b in cont])
  assert set(ids[ids >= 0].tolist()) <= set(data["a"][1]) | set(data["b"][1])


# ---- packing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pack", [True, False])
def test_segments_are_whole_records(data, pack):
  path, refs = data["a"]
  cfg = config([(path, 1.0)], num_epochs=1, pack=pack, max_segments=3 if pack else 1)
  batches = list(ip.make_train_iterator(cfg, process_index=0, process_count=1))
  assert batches
  seen = []
  for b in batches:
    assert b["patches"].shape == (4, 48, PATCH * PATCH * 3) and b["patches"].dtype == np.uint8
    assert b["labels"].shape == (4, cfg.max_segments, 3)
    seen += check_row_segments(b, refs, 48)
  # One epoch: no sample twice; only the last incomplete batch's samples may be missing.
  assert len(seen) == len(set(seen))
  assert len(refs) - len(seen) < 4 * cfg.max_segments
  if pack:
    assert max(len(np.unique(b["sample_id"][r])) for b in batches for r in range(4)) > 2


def test_long_samples_are_truncated_to_a_seeded_ordered_subset(data):
  path, refs = data["long"]
  cfg = config([(path, 1.0)], pack=False, max_segments=1, global_batch_size=2)
  epochs = take(ip.make_train_iterator(cfg, process_index=0, process_count=1), 6)
  subsets = {}
  for b in epochs:
    for r in range(2):
      ref = refs[int(b["sample_id"][r, 0])]
      assert (b["segment_ids"][r] == 1).all()  # exactly N tokens kept
      pos = b["positions"][r]
      keys = (pos[:, 0] * GRID[1] + pos[:, 1]) * GRID[2] + pos[:, 2]
      assert (np.diff(keys) > 0).all()
      ref_keys = (ref["positions"][:, 0] * GRID[1] + ref["positions"][:, 1]) * GRID[2] + ref["positions"][:, 2]
      idx = np.searchsorted(ref_keys, keys)
      np.testing.assert_array_equal(ref_keys[idx], keys)
      np.testing.assert_array_equal(b["patches"][r], flat_tokens(ref)[idx])
      subsets.setdefault(int(b["sample_id"][r, 0]), []).append(tuple(idx))
  # Re-drawn every epoch (each of the 6 samples appears twice in 12 rows).
  assert any(len(set(v)) > 1 for v in subsets.values())
  again = take(ip.make_train_iterator(cfg, process_index=0, process_count=1), 6)
  assert_batches_equal(epochs, again)


# ---- processes and mixing -----------------------------------------------------------------------

def test_process_shards_are_disjoint_and_cover(data):
  path, refs = data["a"]
  per_process = []
  for pi in range(2):
    cfg = config([(path, 1.0)], num_epochs=1, pack=False, max_segments=1, global_batch_size=2)
    ids = [int(b["sample_id"][0, 0]) for b in ip.make_train_iterator(cfg, process_index=pi, process_count=2)]
    assert len(ids) == len(set(ids)) == 30
    per_process.append(set(ids))
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == set(refs)
  # Packed: still disjoint; only each process's last incomplete batch may be missing.
  packed = []
  for pi in range(2):
    cfg = config([(path, 1.0)], num_epochs=1, global_batch_size=4)
    ids = np.concatenate([b["sample_id"].ravel() for b in
                          ip.make_train_iterator(cfg, process_index=pi, process_count=2)])
    packed.append(set(ids[ids >= 0].tolist()))
    assert len(packed[-1]) == (ids >= 0).sum()
  assert not packed[0] & packed[1]
  assert len(set(refs) - packed[0] - packed[1]) < 2 * 2 * 3


def test_padded_global_batches_do_not_depend_on_process_count(data):
  sources = [(data["a"][0], 3.0), (data["long"][0], 1.0)]
  one = take(ip.make_train_iterator(config(sources, pack=False, max_segments=1, hflip=True),
                                    process_index=0, process_count=1), 6)
  two = [take(ip.make_train_iterator(config(sources, pack=False, max_segments=1, hflip=True),
                                     process_index=i, process_count=2), 6) for i in range(2)]
  joined = [{k: np.concatenate([two[0][s][k], two[1][s][k]]) for k in one[s]} for s in range(6)]
  assert_batches_equal(one, joined)


def test_mixing_follows_weights(data):
  (pa, ra), (pb, rb) = data["a"], data["b"]
  cfg = config([(pa, 3.0), (pb, 1.0)], pack=False, max_segments=1, global_batch_size=8)
  ids = np.concatenate([b["sample_id"][:, 0] for b in take(ip.make_train_iterator(cfg, process_index=0, process_count=1), 50)])
  from_a = np.isin(ids, list(ra)).mean()
  assert np.isin(ids, list(ra) + list(rb)).all()
  assert abs(from_a - 0.75) < 0.02, from_a
  # 300 draws from 60 records of a: every record of a shows up, i.e. repeats reshuffle and cover.
  assert set(ids[np.isin(ids, list(ra))].tolist()) == set(ra)


# ---- flips ---------------------------------------------------------------------------------------

def numpy_hflip(rec):
  """Reference: paint the tokens on a dense canvas, mirror the canvas, cut the same tokens out."""
  t, h, w = rec["grid"]
  canvas = np.zeros((t, h * PATCH, w * PATCH, 3), np.uint8)
  for (ti, hi, wi), patch in zip(rec["positions"], rec["patches"]):
    canvas[ti, hi * PATCH:(hi + 1) * PATCH, wi * PATCH:(wi + 1) * PATCH] = patch
  canvas = canvas[:, :, ::-1]
  pos = rec["positions"].copy()
  pos[:, 2] = w - 1 - pos[:, 2]
  pos = pos[np.lexsort((pos[:, 2], pos[:, 1], pos[:, 0]))]
  patches = np.stack([canvas[ti, hi * PATCH:(hi + 1) * PATCH, wi * PATCH:(wi + 1) * PATCH]
                      for ti, hi, wi in pos])
  return patches.reshape(len(pos), -1), pos


def test_hflip_matches_numpy_reference(data):
  path, refs = data["a"]
  cfg = config([(path, 1.0)], num_epochs=1, pack=False, max_segments=1, hflip=True)
  flipped = kept = 0
  for b in ip.make_train_iterator(cfg, process_index=0, process_count=1):
    for r in range(4):
      ref = refs[int(b["sample_id"][r, 0])]
      k = len(ref["positions"])
      got_p, got_pos = b["patches"][r, :k], b["positions"][r, :k]
      want_p, want_pos = numpy_hflip(ref)
      is_flip = np.array_equal(got_p, want_p) and np.array_equal(got_pos, want_pos)
      is_same = np.array_equal(got_p, flat_tokens(ref)) and np.array_equal(got_pos, ref["positions"])
      assert is_flip != is_same
      flipped += is_flip
      kept += is_same
  assert flipped >= 15 and kept >= 15, (flipped, kept)


# ---- global arrays -------------------------------------------------------------------------------

def test_global_batch_on_8_devices(data):
  path, _ = data["a"]
  cfg = config([(path, 1.0)], global_batch_size=8)
  host = next(ip.make_train_iterator(cfg, process_index=0, process_count=1))
  assert (host["sample_id"] & (1 << 31)).any()  # some ids would turn negative as plain int32
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  out = global_arrays.global_batch(host, mesh, ("data", "fsdp"))
  assert sorted(out) == sorted(host)
  for key, arr in out.items():
    want = host[key]
    if key == "sample_id":
      want = np.where(want >= 0, want % 2**31, -1).astype(np.int32)
    assert arr.shape == want.shape
    assert arr.sharding == NamedSharding(mesh, P(("data", "fsdp")))
    np.testing.assert_array_equal(np.asarray(arr), want)
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
      assert shard.data.shape[0] == 2  # 8 rows over data*fsdp = 4 shards
  with pytest.raises(ValueError, match="not divisible"):
    global_arrays.global_batch({k: v[:3] for k, v in host.items()}, mesh)


# ---- config errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,match", [
    ("global_batch_size", 0, "input.global_batch_size"),
    ("global_batch_size", 5, "input.global_batch_size"),  # not divisible by 2 processes
    ("tokens_per_row", -1, "input.tokens_per_row"),
    ("max_segments", 0, "input.max_segments"),
    ("pack", "yes", "input.pack"),
    ("hflip", 1, "input.hflip"),
    ("max_labels", 0, "input.max_labels"),
    ("seed", -3, "input.seed"),
    ("num_epochs", 0, "input.num_epochs"),
    ("worker_count", -1, "input.worker_count"),
    ("patch_size", 0, "input.patch_size"),
    ("label_table", "", "input.label_table"),
    ("sources", [], "input.sources"),
    ("sources", [{"path": "x"}], r"input.sources\[0\]"),
    ("sources", [{"path": "x", "weight": 0.0}], r"input.sources\[0\].weight"),
])
def test_config_errors_name_the_key(data, key, value, match):
  # Not type-safe: a config file or a dict can carry any type, which validation must catch.
  cfg = ml_collections.ConfigDict(config([(data["a"][0], 1.0)]).to_dict(), type_safe=False)
  cfg[key] = value
  with pytest.raises(ValueError, match=match):
    ip.make_train_iterator(cfg, process_index=0, process_count=2)


def test_config_errors_name_paths_and_modes(data, tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match=rf"input.sources\[1\].path.*{missing}"):
    ip.make_train_iterator(config([(data["a"][0], 1.0), (missing, 1.0)]), process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"no shard files match .*nowhere"):
    ip.make_train_iterator(config([(missing + "/data-*", 1.0)]), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="input.max_segments"):
    ip.make_train_iterator(config([(data["a"][0], 1.0)], pack=False), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="input.patch_size=14"):
    next(ip.make_train_iterator(config([(data["a"][0], 1.0)], patch_size=14), process_index=0, process_count=1))
  cfg = config([(data["a"][0], 1.0)])
  cfg.unknown = 1
  with pytest.raises(ValueError, match="input.unknown"):
    ip.make_train_iterator(cfg, process_index=0, process_count=1)
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / records.shard_name(0, 2)).write_bytes(b"")
  with pytest.raises(ValueError, match=r"input.sources\[0\].path.*lacks shard"):
    ip.make_train_iterator(config([(str(partial), 1.0)]), process_index=0, process_count=1)


def test_bad_data_errors_name_the_problem(data, tmp_path):
  empty = digit_shards.write_shards(tmp_path / "empty", [], 2)
  with pytest.raises(ValueError, match=r"input.sources\[0\].path=.*empty: the shards hold no records"):
    ip.make_train_iterator(config([(empty, 1.0)]), process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"input.global_batch_size=128: one pass .*\(13 samples\)"):
    ip.make_train_iterator(config([(data["c"][0], 1.0)], num_epochs=1, global_batch_size=128),
                           process_index=0, process_count=1)
  bad = tmp_path / "garbage"
  bad.mkdir()
  writer = array_record_module.ArrayRecordWriter(str(bad / records.shard_name(0, 1)), "group_size:1")
  writer.write(b"\x01not a record")
  writer.close()
  (bad / "manifest.json").write_text("{}")
  with pytest.raises(ValueError, match="decode_record: "):
    next(ip.make_train_iterator(config([(str(bad), 1.0)], global_batch_size=1), process_index=0,
                                process_count=1))
  with pytest.raises(ValueError, match="eval.batch_size=5"):
    ip.make_eval_batches(data["c"][0], tokens_per_row=48, batch_size=5, patch_size=PATCH,
                         process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r"eval.path: shard directory .*nowhere does not exist"):
    ip.make_eval_batches(str(tmp_path / "nowhere"), tokens_per_row=48, batch_size=4)


def test_glob_sources_read_only_matching_shards(data):
  path, refs = data["a"]
  cfg = config([(os.path.join(path, "data-00001-of-*.array_record"), 1.0)], num_epochs=1, pack=False,
               max_segments=1, global_batch_size=1)
  ids = {int(b["sample_id"][0, 0]) for b in ip.make_train_iterator(cfg, process_index=0, process_count=1)}
  want = {r["sample_id"] for r in records.read_shard(os.path.join(path, records.shard_name(1, 3)))}
  assert ids == want and len(ids) == 20


# ---- labels --------------------------------------------------------------------------------------

def test_label_table_replaces_record_labels(data, tmp_path):
  path, refs = data["a"]
  ids = np.array(sorted(refs), np.int64)
  rng = np.random.default_rng(3)
  table = rng.integers(0, 50, (len(ids), 5)).astype(np.int32)
  table[::4, 2:] = -1  # some samples have fewer labels
  label_table.write_label_table(str(tmp_path), ids, table, num_classes=50)
  want = {int(i): row[row >= 0][:3] for i, row in zip(ids, table)}
  cfg = config([(path, 1.0)], num_epochs=1, label_table=str(tmp_path))
  n = 0
  for b in ip.make_train_iterator(cfg, process_index=0, process_count=1):
    for r, k in zip(*np.nonzero(b["sample_id"] >= 0)):
      got = b["labels"][r, k]
      w = want[int(b["sample_id"][r, k])]
      np.testing.assert_array_equal(got[:w.size], w)
      assert (got[w.size:] == -1).all()
      n += 1
  assert n > 40
  # An id the table lacks is an error naming the key, not a sample silently without labels.
  label_table.write_label_table(str(tmp_path / "short"), ids[1:], table[1:], num_classes=50)
  with pytest.raises(ValueError, match=r"input.label_table: .*not in the table"):
    features.join_labels(refs[int(ids[0])], features.load_label_table(str(tmp_path / "short")))
  with pytest.raises(ValueError, match=r"input.label_table: .*does not exist"):
    ip.make_train_iterator(config([(path, 1.0)], label_table=str(tmp_path / "none.npz")),
                           process_index=0, process_count=1)


# ---- eval ----------------------------------------------------------------------------------------

def test_eval_batches_one_pass_in_order_with_padding(data):
  path, refs = data["c"]
  order = [r["sample_id"] for r in records.read_all(path)]
  batches = list(ip.make_eval_batches(path, tokens_per_row=48, batch_size=4, patch_size=PATCH))
  assert len(batches) == 4
  ids = np.concatenate([b["sample_id"][:, 0] for b in batches])
  np.testing.assert_array_equal(ids[:13], order)
  assert (ids[13:] == -1).all()
  for b in batches:
    assert b["sample_id"].shape == (4, 1)
    real = b["sample_id"][:, 0] >= 0
    check_row_segments({k: v[real] for k, v in b.items()}, refs, 48)
    assert (b["segment_ids"][~real] == 0).all() and (b["class_label"][~real] == -1).all()
  # Two processes: blocks of 6 and 7 records, 2 rows each; both yield 4 batches.
  per = [list(ip.make_eval_batches(path, tokens_per_row=48, batch_size=4, patch_size=PATCH,
                                   process_index=i, process_count=2)) for i in range(2)]
  assert [len(p) for p in per] == [4, 4]
  got = [int(s) for p in per for b in p for s in b["sample_id"][:, 0] if s >= 0]
  assert got == order


# ---- process exit --------------------------------------------------------------------------------

def test_process_exits_cleanly_with_a_live_iterator(data):
  """The background batch thread must be stopped before Python finalizes, or the process aborts."""
  code = ("from ovenc_jax.input import defaults, pipeline\n"
          "cfg = defaults.default_input_config()\n"
          "cfg.update(sources=[{'path': %r, 'weight': 1.0}], global_batch_size=2, tokens_per_row=48,\n"
          "           max_segments=3, patch_size=%d)\n"
          "it = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)\n"
          "next(it)\n" % (data["a"][0], PATCH))
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "terminate called" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-2000:]
