"""Hugging Face-ready exports: AutoModel (trust_remote_code, offline) equals JAX; the model card; push_to_hub."""
import ast
import fcntl
import hashlib
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import jax
import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from ovenc_jax.configs import pretrain
from ovenc_jax.eval import embed as embed_lib
from ovenc_jax.interop import export_torch
from ovenc_jax.interop import torch_layout as layout_lib
from ovenc_jax.interop.hf import card as card_lib
from ovenc_jax.interop import torch_model
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import checkpoint as ckpt_lib
from tests.helpers.tolerances import assert_reorder_close
from tests.test_export_torch import _case, _perturbed_params, _photo_frames

HF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ovenc_jax", "interop", "hf")
TOL = 1e-5
_WORK = {}


def _workdir(layout, tmp_path_factory):
  """(workdir, its config dict, the encoder params of step 7, the jitted JAX apply): a trainer-like workdir
  with two checkpoints, data sources, a label table and the layout's RoPE."""
  if layout not in _WORK:
    work = str(tmp_path_factory.mktemp(f"hf_{layout}") / "train")
    cfg = pretrain.get_config("variant=tiny,data=/data/shards/videos/:0.7+/data/shards/images:0.3")
    cfg.model.rope_layout = layout
    cfg.input.label_table = "/data/labels/kmeans_64.parquet"
    cfg.total_steps = 40
    embed_lib.save_config(work, cfg)
    enc = model_lib.encoder_from_config(cfg.model)
    params = _perturbed_params(enc, seed=5)
    older = jax.tree.map(lambda a: a + np.float32(1.0), params)
    ckpt_lib.write_params_checkpoint(work, {"encoder": older}, step=3)
    ckpt_lib.write_params_checkpoint(work, {"encoder": params}, step=7)
    apply = jax.jit(lambda p, x, pos, seg, s: enc.apply({"params": p}, x, pos, seg, num_segments=s),
                    static_argnums=4)
    with open(os.path.join(work, "config.json")) as f:
      _WORK[layout] = (work, json.load(f), params, apply)
  return _WORK[layout]


def _env(tmp_path, **extra):
  # Offline, a private HF cache (the dynamic modules land there), CI=true: no progress bar in the logs.
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), CI="true")
  env.update(extra)
  return env


def _export(work, out, tmp_path, *extra):
  return subprocess.run([sys.executable, "-m", "ovenc_jax.interop.export_torch", "--workdir", work,
                         "--output", out, *extra], env=_env(tmp_path), capture_output=True, text=True, timeout=300)


_LOAD = """
import json, sys, numpy as np, torch
from transformers import AutoConfig, AutoModel
d, io = sys.argv[1], sys.argv[2]
cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
model = AutoModel.from_pretrained(d, trust_remote_code=True).eval()
result = {"class": type(model).__name__, "config_class": type(cfg).__name__, "model_type": cfg.model_type,
          "rope_layout": model.config.rope_layout}
for case in ("image", "packed_video"):
  z = np.load(f"{io}/{case}_in.npz")
  with torch.no_grad():
    out = model(torch.from_numpy(z["x"]), torch.from_numpy(z["pos"]), segment_ids=torch.from_numpy(z["seg"]),
                num_segments=int(z["s"]))
  np.savez(f"{io}/{case}_out.npz", **{k: v.numpy() for k, v in out.items()})
frames = np.load(f"{io}/frames.npy")
with torch.no_grad():
  video = model.encode_video(torch.from_numpy(frames))
np.save(f"{io}/video_pooled.npy", video["pooled"].numpy())
result["video_positions"] = video["positions"].shape[0]
result["heavy"] = sorted(k for k in sys.modules if k.split(".")[0] in ("ovenc_jax", "jax", "flax"))
print("RESULT", json.dumps(result))
"""


def _sha(d):
  return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["official", "consistent"])
def test_automodel_loads_cli_export_offline_and_matches_jax(layout, tmp_path, tmp_path_factory):
  work, _, params, apply = _workdir(layout, tmp_path_factory)
  out = str(tmp_path / "export")
  r = _export(work, out, tmp_path)
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "configuration_onevision_encoder.py",
                                     "model.safetensors", "modeling_onevision_encoder.py"]
  warned = [line for line in r.stderr.splitlines() if line.startswith("warning: rope_layout=consistent")]
  if layout == "consistent":  # one line naming the layout, the model_type it gets, and why
    assert len(warned) == 1 and "onevision_encoder_consistent" in warned[0] and "pairs RoPE" in warned[0]
  else:
    assert not warned
  assert "tensor/s" not in r.stderr and "export:" not in r.stderr  # CI=true: no progress bar
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  model_class = {"official": "OneVisionEncoderModel", "consistent": "OneVisionEncoderConsistentModel"}[layout]
  config_class = {"official": "OneVisionEncoderConfig", "consistent": "OneVisionEncoderConsistentConfig"}[layout]
  assert cfg["auto_map"] == {"AutoConfig": f"configuration_onevision_encoder.{config_class}",
                             "AutoModel": f"modeling_onevision_encoder.{model_class}"}
  assert cfg["architectures"] == [model_class] and cfg["rope_layout"] == layout and cfg["ovenc_jax"]["step"] == 7

  io = tmp_path / "io"
  io.mkdir()
  refs = {}
  for case in ("image", "packed_video"):
    x, pos, seg, s, _ = _case(case)
    np.savez(io / f"{case}_in.npz", x=x, pos=pos, seg=seg, s=s)
    refs[case] = jax.device_get(apply(params, x, pos, seg, s))
  frames = _photo_frames(2, 3, 4, seed=8)
  np.save(io / "frames.npy", frames)
  before = _sha(out)
  r = subprocess.run([sys.executable, "-c", _LOAD, out, str(io)], cwd=tmp_path, env=_env(tmp_path),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout.split("RESULT ", 1)[1])
  assert result == {"class": model_class, "config_class": config_class, "model_type": cfg["model_type"],
                    "rope_layout": layout, "video_positions": 2 * 3 * 4, "heavy": []}
  # Every weight came from the file: nothing reported missing, unexpected or newly initialised.
  assert not any(w in r.stderr.lower() for w in ("missing", "unexpected", "newly initialized")), r.stderr
  for case, ref in refs.items():
    got = np.load(io / f"{case}_out.npz")
    assert got["pooled"].shape == ref["pooled"].shape and np.std(ref["pooled"]) > 0.1
    for key in ("last_hidden_state", "pooled"):
      assert np.abs(got[key] - ref[key]).max() <= TOL, (case, key)
  assert _sha(out) == before  # loading leaves the export as it was

  # The project's own loader still reads the same folder and computes the same thing.
  model = torch_model.OVEncoder.from_pretrained(out)
  x, pos, seg, s, _ = _case("packed_video")
  with torch.no_grad():
    mine = model(x, pos, segment_ids=seg, num_segments=s)["pooled"].numpy()
    video = model.encode_video(torch.from_numpy(frames))["pooled"].numpy()
  assert np.abs(mine - refs["packed_video"]["pooled"]).max() <= TOL
  # Same code path, another process: equal up to the summation order of its thread count.
  assert_reorder_close(np.load(io / "video_pooled.npy"), video)


@pytest.mark.slow
def test_model_card_fields_match_the_workdir(tmp_path, tmp_path_factory):
  work, train_cfg, _, _ = _workdir("consistent", tmp_path_factory)
  out = str(tmp_path / "export")
  r = _export(work, out, tmp_path, "--step", "3")
  assert r.returncode == 0, r.stderr
  text = open(os.path.join(out, "README.md")).read()
  _, front, body = text.split("---\n", 2)
  meta = yaml.safe_load(front)
  assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
  assert {"vision", "video", "onevision-encoder"} <= set(meta["tags"])
  m = train_cfg["model"]
  for row in (f"| variant | {m['variant']} |", f"| width (`hidden_size`) | {m['width']} |",
              f"| depth (`num_hidden_layers`) | {m['depth']} |",
              f"| attention heads | {m['num_heads']} (head_dim {m['width'] // m['num_heads']}) |",
              f"| MLP width (`intermediate_size`) | {m['mlp_dim']} |",
              f"| patch size | {m['patch_size']} x {m['patch_size']} pixels"):
    assert row in text, row
  assert "- Data sources: `videos` (70%), `images` (30%)" in text
  assert "- Label table: `kmeans_64.parquet`" in text
  assert f"- Classes: {train_cfg['loss']['num_classes']}" in text
  assert "- Total steps configured: 40; this checkpoint: step 3" in text
  assert (f"- Tokens per row in training: {train_cfg['input']['tokens_per_row']}; packed samples per row at "
          f"most: {train_cfg['input']['max_segments']}.") in text
  assert f"- Global batch size (rows): {train_cfg['input']['global_batch_size']}" in text
  assert "layout `consistent`" in text and "Temporal grid: 64 frames" in text
  assert f"`{train_cfg['input']['temporal_positions']}`" in text
  assert "/data/" not in text  # folder names only, no local paths
  assert "$" not in text and "## License\n\nApache-2.0." in text
  # The shapes add up: the card's parameter count is the safetensors' element count.
  n = sum(a.size for a in load_file(os.path.join(out, "model.safetensors")).values())
  assert f"| parameters | {n:,} |" in text


@pytest.mark.slow
def test_progress_bar_on_a_terminal(tmp_path, tmp_path_factory):
  work, _, _, _ = _workdir("official", tmp_path_factory)
  master, slave = pty.openpty()
  # A terminal 100 columns wide: on a 0-column one tqdm draws an empty bar.
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
  chunks = []

  def drain():
    while True:
      try:
        data = os.read(master, 4096)
      except OSError:
        return
      if not data:
        return
      chunks.append(data)

  reader = threading.Thread(target=drain, daemon=True)
  reader.start()
  env = _env(tmp_path)
  env.pop("CI")
  r = subprocess.run([sys.executable, "-m", "ovenc_jax.interop.export_torch", "--workdir", work, "--output",
                      str(tmp_path / "export")], env=env, stdout=subprocess.PIPE, stderr=slave, timeout=300)
  os.close(slave)
  reader.join(timeout=10)
  os.close(master)
  tty = b"".join(chunks).decode(errors="replace")
  assert r.returncode == 0, tty
  n = len(layout_lib.layout(layout_lib.Arch(128, 2, 4, 512, 14)))
  assert f"{n}/{n}" in tty and "export" in tty, tty


@pytest.mark.slow
def test_push_to_hub_uploads_the_export_folder(tmp_path, tmp_path_factory, monkeypatch):
  import huggingface_hub
  calls = []
  monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                      lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
  monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                      lambda self, **kw: calls.append(("upload_folder", kw["repo_id"], kw)))
  work, _, _, _ = _workdir("official", tmp_path_factory)
  out = str(tmp_path / "export")
  export_torch.main(["--workdir", work, "--output", out, "--push_to_hub", "me/ovenc-tiny"])
  assert [c[:2] for c in calls] == [("create_repo", "me/ovenc-tiny"), ("upload_folder", "me/ovenc-tiny")]
  assert calls[1][2]["folder_path"] == os.path.abspath(out) and calls[1][2]["repo_type"] == "model"
  assert 'AutoModel.from_pretrained("me/ovenc-tiny", trust_remote_code=True)' in open(f"{out}/README.md").read()
  # A malformed repo id is refused before anything is exported or uploaded.
  calls.clear()
  r = _export(work, str(tmp_path / "other"), tmp_path, "--push_to_hub", "not-a-repo-id")
  assert r.returncode == 2 and "--push_to_hub 'not-a-repo-id'" in r.stderr and "OWNER/NAME" in r.stderr
  assert not os.path.exists(tmp_path / "other") and not calls


def test_shipped_code_needs_only_torch_and_transformers():
  # A user loading the folder has torch and transformers, not this project.
  allowed = {"dataclasses", "torch", "transformers"}
  for name in card_lib.CODE_FILES:
    tree = ast.parse(open(os.path.join(HF_DIR, name)).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        roots = {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        if node.level:  # the sibling file, copied beside it by transformers
          assert node.module == layout_lib.HF_CONFIG_MODULE, (name, node.module)
          continue
        roots = {node.module.split(".")[0]}
      else:
        continue
      assert roots <= allowed, (name, roots)


def test_shipped_constants_and_config_checks():
  from ovenc_jax.interop.hf import configuration_onevision_encoder as conf
  from ovenc_jax.interop.hf import modeling_onevision_encoder as modeling
  np.testing.assert_array_equal(np.float32(modeling.CLIP_MEAN), model_lib.CLIP_MEAN)
  np.testing.assert_array_equal(np.float32(modeling.CLIP_STD), model_lib.CLIP_STD)
  for hd in (32, 64, 160):
    for a, b in zip(modeling.rope_inverse_frequencies(hd, 10000.0), layout_lib.rope_inverse_frequencies(hd)):
      # The model keeps them as float32 buffers: equal there (float64 pow may differ in the last bit).
      np.testing.assert_array_equal(a.numpy().astype(np.float32), b.astype(np.float32))
  assert conf.OneVisionEncoderConfig.model_type == layout_lib.HF_MODEL_TYPES["official"]
  assert conf.OneVisionEncoderConsistentConfig.model_type == layout_lib.HF_MODEL_TYPES["consistent"]
  assert conf.OneVisionEncoderConsistentConfig().rope_layout == "consistent"
  for kwargs, message in [(dict(rope_layout="xy"), "rope_layout='xy'"),
                          (dict(hidden_size=96, num_attention_heads=4), "head_dim=24"),
                          (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act='gelu_pytorch_tanh'")]:
    with pytest.raises(ValueError, match=message):
      conf.OneVisionEncoderConfig(**kwargs)
  # config.json's model_type must agree with its rope_layout (the project's own loader checks it too).
  cfg = layout_lib.hf_config(layout_lib.Arch(128, 2, 4, 512, 14), rope_layout="consistent")
  cfg["model_type"] = "onevision_encoder"
  with pytest.raises(layout_lib.LayoutError, match="field 'model_type'='onevision_encoder' does not match"):
    layout_lib.parse_hf_config(cfg)
