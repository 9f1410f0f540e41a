"""The three-branch video batch (input.branches): exact split per global batch, each branch's tokens and (t, h, w), restarts and process counts."""
import numpy as np
import pytest

from ovenc_format import records
from ovenc_jax.configs import pretrain
from ovenc_jax.input import branches
from ovenc_jax.input import defaults
from ovenc_jax.input import pipeline as ip
from ovenc_jax.input.validation import validate_input_config
from tests.helpers import digit_shards

PATCH, GRID, F = 4, (8, 4, 4), 4  # 8-frame clips of 4x4 patches; 4 frames per dense/collage sample
HW = GRID[1] * GRID[2]
SPLIT = dict(codec=0.5, frames=0.3, collage=0.2, num_frames=F, period=0)


def clip_record(rng, index, dense_t=np.arange(GRID[0])):
  t, h, w = GRID
  k = F * HW
  flat = np.sort(rng.choice(t * h * w, k, replace=False))
  path = f"clips/{index:04d}"
  return dict(
      patches=rng.integers(0, 256, (k, PATCH, PATCH, 3), dtype=np.uint8),
      positions=np.stack(np.unravel_index(flat, GRID), -1).astype(np.int32),
      grid=np.array(GRID, np.int32), frame_types="I" + "P" * (t - 1), source=path,
      sample_id=records.sample_id_for(path), labels=np.array([index], np.int32), signal="mv+residual",
      class_label=-1, frame_indices=np.arange(t, dtype=np.int32),
      dense_t=np.asarray(dense_t, np.int32),
      dense_patches=rng.integers(0, 256, (len(dense_t) * HW, PATCH, PATCH, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  rng = np.random.default_rng(0)
  folder = digit_shards.write_shards(tmp_path_factory.mktemp("clips") / "c",
                                     [clip_record(rng, i) for i in range(40)], 2)
  return folder, {r["sample_id"]: r for r in records.read_all(folder)}


def config(folder, **kw):
  cfg = defaults.default_input_config()
  cfg.update(sources=[{"path": folder, "weight": 1.0}], global_batch_size=8, tokens_per_row=F * HW,
             max_segments=2, patch_size=PATCH, max_labels=1, seed=3, branches=dict(SPLIT))
  cfg.update(kw)
  return cfg


def frame_images(rec):
  """[D, H*p, W*p, 3] pixel frames of a record's dense patches (independent of branches.py)."""
  d = rec["dense_t"].size
  return (rec["dense_patches"].reshape(d, GRID[1], GRID[2], PATCH, PATCH, 3)
          .transpose(0, 1, 3, 2, 4, 5).reshape(d, GRID[1] * PATCH, GRID[2] * PATCH, 3))


def patchify(image):
  """Raster-order patches [n, p*p*3] and (0, h, w) positions of one still."""
  gh, gw = image.shape[0] // PATCH, image.shape[1] // PATCH
  tiles = image.reshape(gh, PATCH, gw, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
  hh, ww = np.indices((gh, gw))
  return tiles, np.stack([np.zeros(gh * gw, int), hh.ravel(), ww.ravel()], -1)


def branch_of_row(patches, positions, rec):
  """Which branch a row's tokens are, checked against the record: the kept tokens, whole frames at
  their own t (one per bin of T/F frames), or a collage of such frames tiled top to bottom."""
  images = frame_images(rec)
  if np.array_equal(positions, rec["positions"]):
    np.testing.assert_array_equal(patches, rec["patches"].reshape(len(patches), -1))
    return branches.CODEC
  if positions[:, 0].max() == 0:  # one still of F*H x W patches: rebuild it from the picked frames
    tiles = patches.reshape(F, HW, -1)
    picked = []
    for i in range(F):
      match = [j for j in range(len(images)) if np.array_equal(patchify(images[j])[0], tiles[i])]
      assert match and rec["dense_t"][match[0]] // (GRID[0] // F) == i
      picked.append(images[match[0]])
    want_patches, want_positions = patchify(np.concatenate(picked, axis=0))
    np.testing.assert_array_equal(patches, want_patches)
    np.testing.assert_array_equal(positions, want_positions)
    return branches.COLLAGE
  t = np.unique(positions[:, 0])
  np.testing.assert_array_equal(t // (GRID[0] // F), np.arange(F))
  for i, ti in enumerate(t):
    j = int(np.flatnonzero(rec["dense_t"] == ti)[0])
    want_patches, want_positions = patchify(images[j])
    np.testing.assert_array_equal(patches[i * HW:(i + 1) * HW], want_patches)
    np.testing.assert_array_equal(positions[i * HW:(i + 1) * HW, 1:], want_positions[:, 1:])
    assert (positions[i * HW:(i + 1) * HW, 0] == ti).all()
  return branches.FRAMES


def batch_branches(batch, refs):
  out = []
  for r in range(batch["patches"].shape[0]):
    assert (batch["segment_ids"][r] == 1).all() and batch["sample_id"][r, 1] == -1  # one clip a row
    rec = refs[int(batch["sample_id"][r, 0])]
    out.append(branch_of_row(batch["patches"][r], batch["positions"][r], rec))
  return np.asarray(out)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_pattern_counts_and_interleave():
  assert branches.counts(branches.PUBLISHED, 16) == (8, 6, 2)  # the published per-GPU split of 16
  ids = branches.pattern(branches.PUBLISHED, 16)
  np.testing.assert_array_equal(np.bincount(ids, minlength=3), [8, 6, 2])
  # Each half of the period (a process's share with two processes) holds half of each branch.
  np.testing.assert_array_equal(np.bincount(ids[:8], minlength=3), [4, 3, 1])
  assert branches.counts(dict(codec=0.0, frames=0.0, collage=1.0), 5) == (0, 0, 5)


def test_branch_tokens_match_a_numpy_construction():
  rng = np.random.default_rng(1)
  rec = records.decode_record(records.encode_record(clip_record(rng, 0, dense_t=[1, 2, 5, 6])))
  rows = np.array([0, 1, 2, 3])
  images = frame_images(rec)
  coll = branches.collage_record(rec, rows)
  want_patches, want_positions = patchify(np.concatenate(images, axis=0))  # a (F*H*p) x (W*p) still
  np.testing.assert_array_equal(coll["patches"].reshape(len(want_patches), -1), want_patches)
  np.testing.assert_array_equal(coll["positions"], want_positions)
  assert coll["grid"].tolist() == [1, F * GRID[1], GRID[2]]
  fr = branches.frames_record(rec, rows)
  assert branch_of_row(fr["patches"].reshape(F * HW, -1), fr["positions"], rec) == branches.FRAMES
  # One stored frame a bin is always picked; with every frame stored the pick varies, one per bin.
  np.testing.assert_array_equal(branches.pick_frames(rec, F, np.random.default_rng(5)), rows)
  full = clip_record(rng, 1)
  picks = {tuple(full["dense_t"][branches.pick_frames(full, F, np.random.default_rng(s))]) for s in range(20)}
  assert len(picks) > 4 and all((np.asarray(p) // 2 == np.arange(F)).all() for p in picks)
  lone = dict(rec, dense_t=np.array([1, 5]), dense_patches=rec["dense_patches"][:2 * HW])
  with pytest.raises(ValueError, match=r"no stored whole frame in bin 1 of 4.*--dense_frames"):
    branches.pick_frames(lone, F, np.random.default_rng(0))


def test_split_is_exact_per_step_and_positions_as_published(clips):
  folder, refs = clips
  batches = take(ip.make_train_iterator(config(folder), process_index=0, process_count=1), 6)
  for b in batches:
    np.testing.assert_array_equal(np.bincount(batch_branches(b, refs), minlength=3), [4, 2, 2])
  # The dense frames are drawn per step: the same clip in two epochs sees other frames.
  t_sets = {tuple(np.unique(b["positions"][r, :, 0])) for b in batches for r in range(8)
            if batch_branches(b, refs)[r] == branches.FRAMES}
  assert len(t_sets) > 3


def test_restart_and_process_count_give_the_same_batches(clips):
  folder, _ = clips
  it = ip.make_train_iterator(config(folder), process_index=0, process_count=1)
  take(it, 2)
  state = it.get_state()
  cont = take(it, 3)
  again = ip.make_train_iterator(config(folder), process_index=0, process_count=1)
  again.set_state(state)
  for x, y in zip(cont, take(again, 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  one = take(ip.make_train_iterator(config(folder), process_index=0, process_count=1), 5)
  two = [take(ip.make_train_iterator(config(folder), process_index=i, process_count=2), 5) for i in range(2)]
  for s in range(5):
    for k in one[s]:
      np.testing.assert_array_equal(one[s][k], np.concatenate([two[0][s][k], two[1][s][k]]), err_msg=k)


def test_config_and_record_errors(clips):
  folder, _ = clips
  c = pretrain.get_config(f"variant=tiny,geometry=official,branches=official,data={folder}")
  assert dict(c.input.branches) == branches.PUBLISHED
  validate_input_config(c.input)
  c = pretrain.get_config("variant=tiny,branches=0.25/0.5/4")
  assert dict(c.input.branches) == dict(codec=0.25, frames=0.5, collage=0.25, num_frames=4, period=0)
  with pytest.raises(ValueError, match="branches='x'.*CODEC/FRAMES"):
    pretrain.get_config("branches=x")
  for key, value, match in [("codec", 0.7, "must be 1"), ("num_frames", 0, "num_frames must be an int >= 1"),
                            ("frames", -0.1, "frames must be a share")]:
    bad = config(folder, branches=dict(SPLIT, **{key: value}))
    with pytest.raises(ValueError, match=f"input.branches.*{match}"):
      validate_input_config(bad)
  with pytest.raises(ValueError, match="input.branches.*more than input.tokens_per_row=32"):
    take(ip.make_train_iterator(config(folder, tokens_per_row=32), process_index=0, process_count=1), 2)
