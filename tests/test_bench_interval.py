"""bench_codec's interval section: the two motion cases against --interval_frames, and its JSON."""
import importlib.util
import json
import os

import numpy as np


def _bench():
  spec = importlib.util.spec_from_file_location(
      "bench_codec", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_codec.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  return bench


def test_motion_case_clip_moves_as_described(tmp_path):
  bench = _bench()
  boxes = bench.motion_case_clip(str(tmp_path / "m.mp4"), 6, 8, ("travel", "jitter"))
  idx = bench.codec_signals.sample_indices(48, 8)
  x = np.asarray([b["travel"][1] for b in boxes])
  j = np.asarray([b["jitter"][1] for b in boxes])
  assert np.all(x[idx] == x[idx - 1])  # the traveller stands still at each sampled frame
  assert np.all(np.abs(x[idx[1:]] - x[idx[:-1]]) >= 17)  # and moves ~18 px between samples
  assert np.all(j[idx] - j[idx - 1] == 4) and np.all(j[idx + 1] == j[idx - 1])


def test_interval_section_figures(tmp_path):
  bench = _bench()
  path = str(tmp_path / "b.json")
  fig = bench.main(["--clips", "1", "--frames", "8", "--size", "64", "--image_size", "56",
                    "--num_frames", "4", "--sections", "interval", "--interval_rounds", "1",
                    "--json", path])
  saved = json.load(open(path))
  for m in bench.INTERVAL_VALUES:
    key = f"interval_{m}_patchify_over_decode"
    assert saved[key] == fig[key] > 0
  # Every decoded frame scored: the traveller is found alone and beats the jitterer together;
  # only the sampled frames scored (M=1, the version-1 rule): it is missed (issue 14, item 3).
  assert saved["interval_0_L6_alone_travel"] >= 0.9 * 64
  assert saved["interval_0_L16_both_travel"] >= 2 * saved["interval_0_L16_both_jitter"]
  assert saved["interval_1_L6_alone_travel"] <= 0.3 * 64
  assert saved["interval_1_L6_both_jitter"] > saved["interval_1_L6_both_travel"]
