"""The decoder child (data_prep.codec.worker): a fresh interpreter that does not re-import the
parent's __main__, reports a crashed decoder and recovers, and closes safely in every state."""
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from data_prep import make_demo_data as md
from data_prep.codec import config, worker
from ovenc_format import records
from tests.helpers.codec_clips import digit_clip


def _one_digit_clip(path):
  frames, _ = md.render_clip(np.random.default_rng(0), 48, 6, label=1, num_digits=1)
  md.encode_clip(path, frames, gop=4)


def test_child_does_not_reimport_the_parents_main(tmp_path):
  clip, mark = str(tmp_path / "c.mp4"), str(tmp_path / "reimported")
  _one_digit_clip(clip)
  # As Beam's sdk_worker_main would be under multiprocessing's spawn, this __main__ leaves a mark
  # whenever it is imported under another name.
  script = tmp_path / "main_script.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      if __name__ != "__main__":
        open({mark!r}, "w").write(__name__)
      from data_prep.codec import config, worker
      if __name__ == "__main__":
        cfg = config.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
        w = worker.DecodeWorker(cfg, 60)
        print("RESULT", w.run({clip!r}, 3)[0], w.proc.pid)
        w.close()
      """))
  # No PYTHONPATH and a cwd outside the repository: parent and child find the installed package.
  run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=""))
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split("RESULT")[-1].split()[0] == "ok"
  assert not os.path.exists(mark), open(mark).read()


def test_decode_worker_reports_a_crashed_decoder_and_recovers(tmp_path):
  fifo = str(tmp_path / "blocks.mp4")
  os.mkfifo(fifo)
  good = str(tmp_path / "good.mp4")
  digit_clip(good, 3, n=6, size=48)
  cfg = config.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
  decoder = worker.DecodeWorker(cfg, timeout=60)
  try:
    decoder._start()
    # The child blocks opening the FIFO; killing it stands in for a decoder crash.
    threading.Timer(1.0, lambda: os.kill(decoder.proc.pid, signal.SIGKILL)).start()
    result = decoder.run(fifo, -1)
    assert result == ("fail", f"decoder process died (exit code {-signal.SIGKILL})")
    ok = decoder.run(good, 5)  # a fresh child takes over
    assert ok[0] == "ok" and records.decode_record(ok[1])["class_label"] == 5
  finally:
    decoder.close()


def test_decode_worker_close_is_safe_in_every_state(tmp_path, monkeypatch):
  cfg = config.PatchifyConfig(image_size=28, patch_size=14, num_frames=4).validate()
  worker.DecodeWorker(cfg, timeout=5).close()  # never started
  decoder = worker.DecodeWorker(cfg, timeout=5)
  decoder._start()
  os.kill(decoder.proc.pid, signal.SIGKILL)  # died
  decoder.proc.wait(5)
  decoder.close()
  decoder.close()  # closed twice

  def refuse(*args, **kwargs):
    raise OSError("cannot start the decoder child")
  monkeypatch.setattr(worker.subprocess, "Popen", refuse)
  decoder = worker.DecodeWorker(cfg, timeout=5)
  with pytest.raises(OSError, match="decoder child"):
    decoder.run(str(tmp_path / "x.mp4"), -1)  # start failed half-way: a socket pair, no child
  decoder.close()
  assert decoder.proc is None and decoder.conn is None
