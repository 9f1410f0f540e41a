"""The decoder child: a fresh interpreter that does not re-import the parent's __main__, and a
Beam worker whose child cannot start in setup still reports each file."""
import os
import subprocess
import sys
import textwrap

import numpy as np

from data_prep import codec_patchify
from data_prep.codec import signals as cs
from data_prep import make_demo_data as md

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clip(path):
  frames, _ = md.render_clip(np.random.default_rng(0), 48, 6, label=1, num_digits=1)
  md.encode_clip(path, frames, gop=4)


def test_child_does_not_reimport_the_parents_main(tmp_path):
  clip, mark = str(tmp_path / "c.mp4"), str(tmp_path / "reimported")
  _clip(clip)
  # As Beam's sdk_worker_main would be under multiprocessing's spawn, this __main__ leaves a mark
  # whenever it is imported under another name.
  script = tmp_path / "main_script.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      if __name__ != "__main__":
        open({mark!r}, "w").write(__name__)
      sys.path.insert(0, {REPO!r})
      from data_prep.codec import signals as cs
      if __name__ == "__main__":
        cfg = cs.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
        w = cs.DecodeWorker(cfg, 60)
        print("RESULT", w.run({clip!r}, 3)[0], w.proc.pid)
        w.close()
      """))
  run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=""))
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split("RESULT")[-1].split()[0] == "ok"
  assert not os.path.exists(mark), open(mark).read()


def test_setup_survives_a_child_that_cannot_start(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise OSError("no processes left")
  monkeypatch.setattr(cs.subprocess, "Popen", refuse)
  cfg = cs.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
  staging = str(tmp_path / "staging")
  os.makedirs(staging)
  fn = codec_patchify.PatchifyFn(cfg, {}, 30.0, 1e9, staging, 1 << 20)
  fn.setup()  # the failed prestart is logged, not raised
  assert fn.worker.proc is None and fn.worker.conn is None
  fn.start_bundle()
  fn.process(str(tmp_path / "x.mp4"))
  fn.finish_bundle()
  fn.teardown()
  parts = codec_patchify._read_parts(staging)
  rows = [r for p in parts for r in p["failures"]]
  assert rows == [{"path": str(tmp_path / "x.mp4"),
                   "reason": "internal error: OSError: no processes left"}]


def test_beam_worker_side_imports_stay_light():
  """A Beam worker only hands videos to its decoder child: importing the job module there pulls in
  neither numba (the child compiles and runs the signal kernel) nor dask's distributed, and asking
  whether it runs in a Dask worker at teardown does not import distributed either."""
  code = ("import sys; from data_prep import codec_patchify as cp; a = cp._in_dask_worker(); "
          "print(a, 'numba' in sys.modules, 'distributed' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True, env=dict(os.environ, PYTHONPATH=REPO)).stdout.split()
  assert out == ["False", "False", "False"]
