"""--score_on reencode: the sampled frames re-encoded (P-only, GOP 16), keyframes zeroed, global top-K."""
import numpy as np
import pytest

from data_prep import make_demo_data as md
from data_prep.codec import clip
from data_prep.codec.config import PatchifyConfig
from tests.helpers import codec_clips as cc

P = cc.P
# H.264 codes motion in blocks of up to 16 px: a patch within half a macroblock of the object
# shares a block with it.
MARGIN = 8


def _moving_object_clip(path, n=64):
  """One textured square on a textured still background, moving right and up and down."""
  rng = np.random.default_rng(0)
  bg = md.textured_background(rng, cc.S, cc.S)
  sq = rng.uniform(0, 255, (6, 6, 3)).repeat(4, 0).repeat(4, 1)
  frames, boxes = [], []
  for i in range(n):
    y, x = 40 + int(round(20 * np.sin(i / 10))), 8 + i
    f = bg.copy()
    f[y:y + 24, x:x + 24] = sq
    frames.append(f)
    boxes.append((y, x, y + 24, x + 24))
  cc.encode(path, np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8))
  return boxes


@pytest.fixture(scope="module")
def moving(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("reencode") / "moving.mp4")
  return path, _moving_object_clip(path)


def _on_path(t, h, w, boxes):
  return any(h * P < y1 + MARGIN and (h + 1) * P > y0 - MARGIN and w * P < x1 + MARGIN and (w + 1) * P > x0 - MARGIN
             for y0, x0, y1, x1 in boxes[max(t - 1, 0):t + 1])


def test_reencode_scoring_keeps_the_moving_object_deterministically(moving):
  path, boxes = moving
  cfg = PatchifyConfig(num_frames=64, image_size=cc.S, score_on="reencode").validate()
  a = clip.patchify_video(path, cfg, seed=(0, 1))
  b = clip.patchify_video(path, cfg, seed=(0, 1))
  np.testing.assert_array_equal(a["positions"], b["positions"])
  np.testing.assert_array_equal(a["scores"], b["scores"])
  np.testing.assert_array_equal(a["patches"], b["patches"])
  assert "transcode" in a["signal"] and "mv" in a["signal"] and a["grid"].tolist() == [64, 8, 8]
  pos = a["positions"]
  assert len(pos) == 512
  counts = np.bincount(pos[:, 0], minlength=64)
  assert counts[0] == 64  # --iframe keep: the first frame whole
  # The re-encode's keyframes (every 16th sampled frame) score 0 and keep nothing.
  np.testing.assert_array_equal(a["scores"][[16, 32, 48]], 0.0)
  assert (counts[[16, 32, 48]] == 0).all() and (np.delete(counts, [0, 16, 32, 48]) > 0).all()
  rest = pos[pos[:, 0] > 0]
  share = np.mean([_on_path(t, h, w, boxes) for t, h, w in rest])
  assert share >= 0.9, share


def test_score_on_is_checked():
  with pytest.raises(ValueError, match="score_on='x'"):
    PatchifyConfig(score_on="x").validate()
