"""run_demo.sh's guard on OUT (`--check-out`): it never replaces a folder it did not make, nor '..', /, $HOME or the checkout."""
import hashlib
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_demo.sh"
MARKER = ".ovenc-demo"


def _check(out, env=None):
  return subprocess.run(["bash", str(SCRIPT), "--check-out", str(out)], capture_output=True, text=True,
                        timeout=60, env=env)


def _sha(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_existing_unmarked_folder_is_refused_and_left_alone(tmp_path):
  out = tmp_path / "results"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  before = _sha(out / "keep.txt")
  r = _check(out)
  assert r.returncode != 0
  assert str(out) in r.stderr and MARKER in r.stderr, r.stderr
  assert sorted(os.listdir(out)) == ["keep.txt"] and _sha(out / "keep.txt") == before


def test_dotdot_is_refused_even_onto_a_marked_folder(tmp_path):
  out = tmp_path / "demo"
  out.mkdir()
  (out / MARKER).write_text("")
  dotted = f"{tmp_path}/x/../demo"
  r = _check(dotted)
  assert r.returncode != 0 and "'..'" in r.stderr and dotted in r.stderr, r.stderr
  r = _check("..")
  assert r.returncode != 0 and "'..'" in r.stderr, r.stderr


def test_marked_empty_and_new_folders_are_accepted(tmp_path):
  marked = tmp_path / "demo"
  marked.mkdir()
  (marked / MARKER).write_text("")
  (marked / "train.log").write_text("old run")
  empty = tmp_path / "empty"
  empty.mkdir()
  for out in (marked, empty, tmp_path / "new"):
    r = _check(out)
    assert r.returncode == 0, (out, r.stderr)
  # Checking changes nothing.
  assert sorted(os.listdir(marked)) == [MARKER, "train.log"] and not (tmp_path / "new").exists()


@pytest.mark.parametrize("which", ["root", "home", "checkout", "checkout_dot"])
def test_root_home_and_checkout_are_refused_even_when_marked(tmp_path, which):
  home = tmp_path / "home"
  home.mkdir()
  (home / MARKER).write_text("")  # a marker does not make $HOME replaceable
  out = {"root": "/", "home": str(home), "checkout": str(ROOT), "checkout_dot": "."}[which]
  r = _check(out, env=dict(os.environ, HOME=str(home)))
  assert r.returncode != 0 and f"OUT '{out}'" in r.stderr, r.stderr
  assert (home / MARKER).exists()


def test_a_file_and_a_symlink_are_refused(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  link = tmp_path / "link"
  link.symlink_to(tmp_path)
  for out in (f, link):
    r = _check(out)
    assert r.returncode != 0 and str(out) in r.stderr, r.stderr
  assert f.read_text() == "x"


def test_the_demo_itself_refuses_before_doing_anything(tmp_path):
  out = tmp_path / "results"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  before = _sha(out / "keep.txt")
  # The guard runs before the install step: a refusal returns at once.
  r = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60,
                     env=dict(os.environ, DEMO_STEPS="1"))
  assert r.returncode == 2 and str(out) in r.stderr, r.stderr
  assert sorted(os.listdir(out)) == ["keep.txt"] and _sha(out / "keep.txt") == before
