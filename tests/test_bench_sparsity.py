"""benchmarks/bench_sparsity.py --quick completes and writes a well-formed table, JSON and plot."""
import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # multi-process or long end-to-end runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_writes_table_json_and_plot(tmp_path):
  out = tmp_path / "bench"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_sparsity.py"), "--quick",
                         "--workdir", str(out), "--json", str(tmp_path / "r.json")],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]

  lines = (out / "table.md").read_text().strip().splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header == ["rule", "budget", "tokens/clip", "train TFLOPs", "vs dense", "wall s", "kNN top-1",
                    "linear probe"]
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  assert [r[0] for r in rows] == ["codec", "random", "uniform_frames", "dense"]
  assert all(len(r) == len(header) for r in rows)
  for r in rows:
    for acc in r[6:]:
      mean, std = (float(x) for x in acc.split("+-"))
      assert 0 <= mean <= 1 and std >= 0
  assert [int(r[2]) for r in rows] == [8, 8, 8, 64]  # 12.5% and all of a 4 x 4 x 4 grid
  assert float(rows[-1][4]) == 1.0 and 0 < float(rows[0][4]) < 1

  res = json.loads((tmp_path / "r.json").read_text())
  cells = {c["rule"]: c for c in res["cells"]}
  assert math.isclose(res["codec_minus_random_knn_12_5"], cells["codec"]["knn_mean"] - cells["random"]["knn_mean"])
  assert math.isclose(res["codec_12_5_minus_dense_knn"], cells["codec"]["knn_mean"] - cells["dense"]["knn_mean"])
  for c in res["cells"]:  # FLOPs are the step's count times the steps, over exactly the tokens seen
    assert c["train_flops"] == c["step_flops"] * res["settings"]["steps"] > 0
    assert c["tokens_seen"] == res["settings"]["steps"] * res["settings"]["batch"] * c["tokens_per_clip"]
  assert cells["dense"]["step_flops"] > 4 * cells["codec"]["step_flops"]
  with open(out / "sparsity.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
