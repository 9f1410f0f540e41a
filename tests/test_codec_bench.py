"""benchmarks/bench_codec.py run as a script (--json): the codec, transcode, rss and interval
sections, and the motion cases its interval section measures (make_demo_data.motion_case_clip)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from data_prep import make_demo_data
from data_prep.codec.selection import sample_indices

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "bench_codec.py")
INTERVAL_VALUES = (0, 1, 2, 4, 8)  # the --interval_frames values of the interval section


def _run_bench(tmp_path, args):
  """(figures saved by --json, stdout) of one run of the benchmark script."""
  path = str(tmp_path / "b.json")
  proc = subprocess.run([sys.executable, BENCH, *args, "--json", path], capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(path) as f:
    return json.load(f), proc.stdout


def test_motion_case_clip_moves_as_described(tmp_path):
  boxes = make_demo_data.motion_case_clip(str(tmp_path / "m.mp4"), 6, 8, ("travel", "jitter"))
  idx = sample_indices(48, 8)
  x = np.asarray([b["travel"][1] for b in boxes])
  j = np.asarray([b["jitter"][1] for b in boxes])
  assert np.all(x[idx] == x[idx - 1])  # the traveller stands still at each sampled frame
  assert np.all(np.abs(x[idx[1:]] - x[idx[:-1]]) >= 17)  # and moves ~18 px between samples
  assert np.all(j[idx] - j[idx - 1] == 4) and np.all(j[idx + 1] == j[idx - 1])


def test_interval_section_figures(tmp_path):
  saved, out = _run_bench(tmp_path, ["--clips", "1", "--frames", "8", "--size", "64",
                                     "--image_size", "56", "--num_frames", "4", "--sections",
                                     "interval", "--interval_rounds", "1"])
  printed = dict((int(m), r) for m, r in re.findall(r"^\s*(\d+)\s+(\d+\.\d\d)\s", out, re.M))
  assert sorted(printed) == list(INTERVAL_VALUES)
  for m in INTERVAL_VALUES:
    key = f"interval_{m}_patchify_over_decode"
    assert saved[key] > 0 and f"{saved[key]:.2f}" == printed[m]  # the table shows the JSON's
  # Every decoded frame scored: the traveller is found alone and beats the jitterer together;
  # only the sampled frames scored (M=1): it is missed.
  assert saved["interval_0_L6_alone_travel"] >= 0.9 * 64
  assert saved["interval_0_L16_both_travel"] >= 2 * saved["interval_0_L16_both_jitter"]
  assert saved["interval_1_L6_alone_travel"] <= 0.3 * 64
  assert saved["interval_1_L6_both_jitter"] > saved["interval_1_L6_both_travel"]


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
  # The beam section (DirectRunner and Dask jobs) is left out: test_dask_runner and
  # test_codec_patchify run those jobs.
  saved, out = _run_bench(tmp_path, ["--clips", "1", "--frames", "8", "--size", "64", "--rounds",
                                     "1", "--image_size", "56", "--num_frames", "4", "--sections",
                                     "codec,transcode,rss,reencode", "--transcode_rounds", "1",
                                     "--rss_videos", "1"])
  assert saved["frames"] == 8 and saved["videos"] == 1
  assert saved["rss_ratio_10x"] == pytest.approx(
      saved["rss_peak_gib_10x"] / saved["rss_peak_gib_1x"])
  for key in ("patchify_over_decode", "a_decode_frames_per_s", "b_decode_mvs_videos_per_s",
              "c_patchify_frames_per_s", "rss_ratio_10x", "transcode_over_patchify",
              "every_frame_ceiling_over_decode", "reencode_over_decode"):
    assert isinstance(saved[key], float) and saved[key] > 0
  assert f"reencode_over_decode (r/a) = {saved['reencode_over_decode']:.2f}" in out
  assert saved["patchify_over_decode"] == pytest.approx(
      saved["c_patchify_videos_per_s"] / saved["a_decode_videos_per_s"])
  # The printed summary shows the saved figures.
  for line in (f"patchify_over_decode (c/a) = {saved['patchify_over_decode']:.2f}",
               f"every_frame_ceiling_over_decode (c0/a) = "
               f"{saved['every_frame_ceiling_over_decode']:.2f}",
               f"rss_ratio_10x = {saved['rss_ratio_10x']:.2f}"):
    assert line in out, (line, out)
