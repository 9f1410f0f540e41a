"""PyTorch export/import: official layout, JAX-vs-PyTorch golden outputs, bitwise round trips, errors, CLIs."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
import torch
from safetensors.numpy import load_file, save_file
from sklearn.datasets import load_sample_image
from tests.helpers.tolerances import assert_reorder_close

from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.configs import pretrain
from ovenc_jax.train import checkpoint as ckpt_lib
from ovenc_jax.eval import embed as embed_lib
from ovenc_jax.interop import export_torch
from ovenc_jax.interop import import_torch
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.model import rope as rope_lib
from ovenc_jax.interop import torch_layout as layout_lib
from ovenc_jax.interop import torch_model

P = 14
TOL = 1e-4


def _photo_frames(t, h, w, seed=0):
  """t real-photo frames [t, h*P, w*P, 3] uint8, each a different crop (content moves between frames)."""
  img = load_sample_image("china.jpg")
  rng = np.random.default_rng(seed)
  frames = []
  for _ in range(t):
    y, x = rng.integers(0, img.shape[0] - h * P), rng.integers(0, img.shape[1] - w * P)
    frames.append(img[y:y + h * P, x:x + w * P])
  return np.stack(frames).astype(np.uint8)


def _cut(frames, positions):
  """Reference patch cutting, one slice per token: frames[t, rows, cols, :] flattened (row, col, channel)."""
  return np.stack([frames[t, h * P:(h + 1) * P, w * P:(w + 1) * P, :].reshape(-1) for t, h, w in positions])


def _perturbed_params(enc, seed):
  """Init, then move every leaf away from its init so norms, biases and the probe all matter."""
  x = np.zeros((1, 4, P * P * 3), np.uint8)
  pos = np.zeros((1, 4, 3), np.int32)
  boxed = enc.init(jax.random.key(seed), x, pos, np.ones((1, 4), np.int32))["params"]
  params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))
  rng = np.random.default_rng(seed)

  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    noise = rng.normal(size=a.shape).astype(np.float32)
    if "scale" in name:
      return (1.0 + 0.3 * noise).astype(np.float32)
    if "bias" in name:
      return (0.2 * noise).astype(np.float32)
    return (a + 0.02 * noise).astype(np.float32)

  return jax.tree_util.tree_map_with_path(perturb, params)


_BUILT = {}


def _build(layout, tmp_path_factory):
  """(layout, jitted JAX apply, params, PyTorch model loaded from an export directory, export dir)."""
  if layout not in _BUILT:
    cfg = model_defaults.model_config("tiny")
    cfg.rope_layout = layout
    enc = model_lib.encoder_from_config(cfg)
    params = _perturbed_params(enc, seed=3)
    apply = jax.jit(lambda p, x, pos, seg, s: enc.apply({"params": p}, x, pos, seg, num_segments=s),
                    static_argnums=4)
    out_dir = str(tmp_path_factory.mktemp(f"export_{layout}") / "torch")
    export_torch.export_params(params, out_dir, rope_layout=layout)
    model = torch_model.OVEncoder.from_pretrained(out_dir)
    _BUILT[layout] = (layout, apply, params, model, out_dir)
  return _BUILT[layout]


@pytest.fixture(scope="module", params=["official", "consistent"])
def pair(request, tmp_path_factory):
  return _build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  return _build("official", tmp_path_factory)


@pytest.fixture(scope="module")
def consistent(tmp_path_factory):
  return _build("consistent", tmp_path_factory)


def _case(name):
  """(patches, positions, segment_ids, num_segments, mask or None) for each input layout."""
  rng = np.random.default_rng(7)
  if name == "image":  # two photos, full 6x5 grid at t = 0, row-major (non-square to catch h/w swaps)
    pos = np.array([(0, h, w) for h in range(6) for w in range(5)], np.int32)
    x = np.stack([_cut(_photo_frames(1, 6, 5, seed=s), pos) for s in (0, 1)])
    return x, np.stack([pos, pos]), np.ones((2, 30), np.int32), 1, None
  if name == "packed_video":  # sparse (t, h, w) sets: row 0 packs 2 clips + padding; row 1 one clip
    frames = _photo_frames(8, 10, 10, seed=2)
    cells = np.stack(np.unravel_index(rng.choice(800, size=(2, 64), replace=False).ravel(), (8, 10, 10)), -1)
    pos = cells.reshape(2, 64, 3).astype(np.int32)
    x = np.stack([_cut(frames, pos[0]), _cut(frames, pos[1])])
    seg0 = rng.permutation(np.r_[np.full(25, 1), np.full(20, 2), np.zeros(19)])
    seg1 = np.r_[np.full(40, 1), np.zeros(24)]
    # 3 segments: segment 3 (and 2 in row 1) are empty, exercising the fully masked probe.
    return x, pos, np.stack([seg0, seg1]).astype(np.int32), 3, None
  if name == "float_mask":  # float patches, a boolean mask instead of segment ids
    x = rng.normal(size=(2, 36, P * P * 3)).astype(np.float32)
    pos = rng.integers(0, 20, size=(2, 36, 3)).astype(np.int32)
    mask = np.zeros((2, 36), bool)
    mask[0, :30] = True
    mask[1, rng.choice(36, 20, replace=False)] = True
    return x, pos, mask.astype(np.int32), 1, mask
  raise AssertionError(name)


def _torch_run(model, x, pos, seg, s, mask=None):
  with torch.no_grad():
    if mask is not None:
      out = model(x, pos, mask=mask, num_segments=s)
    else:
      out = model(x, pos, segment_ids=seg, num_segments=s)
  return {k: v.numpy() for k, v in out.items()}


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---- layout -----------------------------------------------------------------------------------

def _expected_keys(d, m, h, depth, p):
  """The state dict the issue specifies, written out independently of torch_layout."""
  keys = {"embeddings.patch_embedding.weight": (d, 3, p, p),
          "layernorm_pre.weight": (d,), "layernorm_pre.bias": (d,),
          "layernorm_post.weight": (d,), "layernorm_post.bias": (d,),
          "head.probe": (1, 1, d), "head.attention.in_proj_weight": (3 * d, d),
          "head.attention.in_proj_bias": (3 * d,), "head.attention.out_proj.weight": (d, d),
          "head.attention.out_proj.bias": (d,), "head.norm.weight": (d,),
          "head.mlp.fc1.weight": (m, d), "head.mlp.fc1.bias": (m,),
          "head.mlp.fc2.weight": (d, m), "head.mlp.fc2.bias": (d,)}
  for i in range(depth):
    pre = f"encoder.layers.{i}"
    for ln in ("layer_norm1", "layer_norm2"):
      keys.update({f"{pre}.{ln}.weight": (d,), f"{pre}.{ln}.bias": (d,)})
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      keys.update({f"{pre}.self_attn.{proj}.weight": (d, d), f"{pre}.self_attn.{proj}.bias": (d,)})
    keys.update({f"{pre}.mlp.fc1.weight": (m, d), f"{pre}.mlp.fc1.bias": (m,),
                 f"{pre}.mlp.fc2.weight": (d, m), f"{pre}.mlp.fc2.bias": (d,)})
  return keys


def test_state_dict_names_shapes_and_config(pair):
  layout, _, params, model, out_dir = pair
  d, depth, h, m = model_defaults.VARIANTS["tiny"]
  want = _expected_keys(d, m, h, depth, P)
  state = load_file(os.path.join(out_dir, layout_lib.MODEL_FILE))
  assert {k: v.shape for k, v in state.items()} == want
  assert all(v.dtype == np.float32 for v in state.values())
  # The stock torch modules (Conv2d, Linear, LayerNorm, MultiheadAttention, RMSNorm) have exactly these.
  assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
  norms = [mod for mod in model.modules() if isinstance(mod, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
  assert len(norms) == 2 * depth + 3 and all(mod.eps == 1e-6 for mod in norms)
  # Spot values against the Flax leaves, by hand: Linear kernels are transposed to [out, in].
  np.testing.assert_array_equal(state["encoder.layers.1.mlp.fc1.weight"], params["layers_1"]["mlp"]["fc1"]["kernel"].T)
  q = params["head"]["attention"]["q_proj"]["kernel"].reshape(d, d).T
  v = params["head"]["attention"]["v_proj"]["kernel"].reshape(d, d).T
  np.testing.assert_array_equal(state["head.attention.in_proj_weight"][:d], q)
  np.testing.assert_array_equal(state["head.attention.in_proj_weight"][2 * d:], v)
  with open(os.path.join(out_dir, layout_lib.CONFIG_FILE)) as f:
    cfg = json.load(f)
  # consistent exports get their own model_type, so the published code never takes them for its own.
  suffix = {"official": "", "consistent": "_consistent"}[layout]
  model_class = {"official": "OneVisionEncoderModel", "consistent": "OneVisionEncoderConsistentModel"}[layout]
  assert cfg["model_type"] == "onevision_encoder" + suffix and cfg["architectures"] == [model_class]
  assert cfg["auto_map"]["AutoModel"] == f"modeling_onevision_encoder.{model_class}"
  assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
          cfg["intermediate_size"], cfg["patch_size"]) == (d, depth, h, m, P)
  assert cfg["hidden_act"] == "gelu" and cfg["layer_norm_eps"] == 1e-6 and cfg["use_head"] is True
  assert cfg["rope_layout"] == layout and cfg["rope_theta"] == 10000.0


def test_patch_embedding_is_the_release_conv2d(pair):
  # The release runs nn.Conv2d over whole CLIP-normalised images [B, 3, H, W]; with the exported weight
  # that must give the JAX patch embedding of each cut patch, in row-major token order.
  _, _, params, _, out_dir = pair
  frame = _photo_frames(1, 4, 6, seed=5)[0]
  pixels = (frame / 255.0 - model_lib.CLIP_MEAN) / model_lib.CLIP_STD
  weight = torch.from_numpy(load_file(os.path.join(out_dir, layout_lib.MODEL_FILE))["embeddings.patch_embedding.weight"])
  conv = torch.nn.functional.conv2d(torch.from_numpy(pixels.transpose(2, 0, 1)[None].astype(np.float32)),
                                    weight, stride=P)
  tokens = conv.flatten(2).transpose(1, 2)[0].numpy()
  pos = [(0, h, w) for h in range(4) for w in range(6)]
  flat = (_cut(frame[None], pos).reshape(24, -1, 3) / 255.0 - model_lib.CLIP_MEAN) / model_lib.CLIP_STD
  ref = flat.reshape(24, -1) @ params["patch_embedding"]["kernel"]
  assert _max_diff(tokens, ref) < 1e-4


def test_torch_constants_match_jax_model():
  np.testing.assert_array_equal(np.float32(layout_lib.CLIP_MEAN), model_lib.CLIP_MEAN)
  np.testing.assert_array_equal(np.float32(layout_lib.CLIP_STD), model_lib.CLIP_STD)
  assert layout_lib.NORM_EPS == model_lib.LN_EPS
  for hd in (32, 64, 80 * 2):
    for a, b in zip(layout_lib.rope_inverse_frequencies(hd), rope_lib.axis_frequencies(hd)):
      np.testing.assert_array_equal(a, b)


# ---- golden: JAX vs PyTorch --------------------------------------------------------------------

@pytest.mark.parametrize("case", ["image", "packed_video", "float_mask"])
def test_golden_jax_vs_torch(pair, case):
  _, apply, params, model, _ = pair
  x, pos, seg, s, mask = _case(case)
  ref = jax.device_get(apply(params, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg), s))
  got = _torch_run(model, x, pos, seg, s, mask)
  assert got["last_hidden_state"].shape == ref["last_hidden_state"].shape
  assert got["pooled"].shape == ref["pooled"].shape == (x.shape[0], s, 128)
  assert np.std(ref["pooled"]) > 0.1 and np.std(ref["last_hidden_state"]) > 0.1  # non-trivial outputs
  assert _max_diff(got["last_hidden_state"], ref["last_hidden_state"]) <= TOL
  assert _max_diff(got["pooled"], ref["pooled"]) <= TOL


def test_golden_check_is_sensitive(pair):
  # The same weights under the other RoPE layout, or with one segment id moved, must miss the reference.
  layout, apply, params, model, _ = pair
  x, pos, seg, s, _ = _case("packed_video")
  ref = jax.device_get(apply(params, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg), s))
  other = torch_model.OVEncoder(model.arch, "consistent" if layout == "official" else "official")
  other.load_state_dict(model.state_dict())
  got = _torch_run(other.eval(), x, pos, seg, s)
  assert _max_diff(got["pooled"], ref["pooled"]) > 1e-2
  seg_moved = seg.copy()
  seg_moved[0, np.flatnonzero(seg[0] == 1)[0]] = 2
  got = _torch_run(model, x, pos, seg_moved, s)
  assert _max_diff(got["pooled"][0, :2], ref["pooled"][0, :2]) > 1e-3


def test_dense_video_convenience(pair):
  _, apply, params, model, _ = pair
  frames = _photo_frames(3, 4, 5, seed=9)
  rng = np.random.default_rng(4)
  cells = np.stack(np.unravel_index(rng.choice(60, 25, replace=False), (3, 4, 5)), -1).astype(np.int32)
  for kept in (cells, None):
    pos = kept if kept is not None else np.array(np.meshgrid(range(3), range(4), range(5), indexing="ij"),
                                                 np.int32).reshape(3, -1).T
    ref = jax.device_get(apply(params, jnp.asarray(_cut(frames, pos))[None], jnp.asarray(pos)[None],
                               jnp.ones((1, len(pos)), jnp.int32), 1))
    with torch.no_grad():
      got = model.encode_video(torch.from_numpy(frames), kept)
    np.testing.assert_array_equal(got["positions"].numpy(), pos)
    assert _max_diff(got["last_hidden_state"].numpy(), ref["last_hidden_state"]) <= TOL
    assert _max_diff(got["pooled"].numpy(), ref["pooled"]) <= TOL
  with pytest.raises(ValueError, match=r"positions\[0\]=\[3, 0, 0\] is outside"):
    model.encode_video(frames, np.array([[3, 0, 0]]))
  with pytest.raises(ValueError, match="multiples of patch_size=14"):
    model.encode_video(frames[:, :50], None)


# ---- round trips ------------------------------------------------------------------------------

def _assert_bitwise_equal(a, b):
  fa, fb = layout_lib.flatten(a), layout_lib.flatten(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    x, y = np.asarray(fa[path]), np.asarray(fb[path])
    assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, path
    assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), path


def test_roundtrip_jax_torch_jax_is_bitwise(pair, tmp_path):
  layout, _, params, _, _ = pair
  centers = np.random.default_rng(0).normal(size=(64, 128)).astype(np.float32)
  export_torch.export_params(params, str(tmp_path / "out"), rope_layout=layout, centers=centers)
  model_cfg, back = import_torch.read_export(str(tmp_path / "out"))
  _assert_bitwise_equal(back, {"encoder": params, "centers": centers})
  assert model_cfg.variant == "tiny" and model_cfg.rope_layout == layout
  # Re-exporting overwrites the earlier export in place; a foreign directory is refused.
  export_torch.export_params(params, str(tmp_path / "out"), rope_layout=layout)
  assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "config.json", "configuration_onevision_encoder.py",
                                                  "model.safetensors", "modeling_onevision_encoder.py"]
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="notes.txt"):
    export_torch.export_params(params, str(tmp_path / "mine"))


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_clis_from_real_checkpoint(consistent, tmp_path):
  # One layout suffices for the CLI path; the non-default one proves the config is carried through.
  layout, _, params, _, _ = consistent
  centers = np.random.default_rng(1).normal(size=(64, 128)).astype(np.float32)
  work = str(tmp_path / "train")
  cfg = pretrain.get_config("variant=tiny")
  cfg.model.rope_layout = layout
  embed_lib.save_config(work, cfg)  # what the trainer writes into its workdir
  older = jax.tree.map(lambda a: a + np.float32(1.0), params)
  ckpt_lib.write_params_checkpoint(work, {"encoder": older, "centers": centers}, step=3)
  ckpt_lib.write_params_checkpoint(work, {"encoder": params, "centers": centers}, step=7)

  r = _run_cli("ovenc_jax.interop.export_torch", "--workdir", work, "--output", str(tmp_path / "pt"), "--with_centers")
  assert r.returncode == 0, r.stderr
  with open(tmp_path / "pt" / "config.json") as f:
    hf_cfg = json.load(f)
  assert hf_cfg["rope_layout"] == layout and hf_cfg["ovenc_jax"]["step"] == 7
  r = _run_cli("ovenc_jax.interop.import_torch", "--input", str(tmp_path / "pt"), "--workdir", str(tmp_path / "back"))
  assert r.returncode == 0, r.stderr
  step, back = ckpt_lib.load_params(str(tmp_path / "back"))
  assert step == 0
  _assert_bitwise_equal(back, {"encoder": params, "centers": centers})
  assert embed_lib.load_model_config(str(tmp_path / "back")).rope_layout == layout

  # --step picks an older checkpoint; importing into a workdir that has checkpoints is refused.
  export_torch.main(["--workdir", work, "--step", "3", "--output", str(tmp_path / "pt3")])
  _, back3 = import_torch.read_export(str(tmp_path / "pt3"))
  _assert_bitwise_equal(back3, {"encoder": older})
  r = _run_cli("ovenc_jax.interop.import_torch", "--input", str(tmp_path / "pt"), "--workdir", str(tmp_path / "back"))
  assert r.returncode != 0 and "already holds checkpoints" in r.stderr
  # A workdir without config.json exports from the shapes alone (official RoPE unless told).
  bare = str(tmp_path / "bare")
  ckpt_lib.write_params_checkpoint(bare, {"encoder": params}, step=1)
  export_torch.main(["--workdir", bare, "--output", str(tmp_path / "pt_bare"), "--rope_layout", layout])
  cfg_bare, back_bare = import_torch.read_export(str(tmp_path / "pt_bare"))
  assert cfg_bare.rope_layout == layout
  _assert_bitwise_equal(back_bare, {"encoder": params})
  with pytest.raises(SystemExit, match="has no params/centers"):
    export_torch.main(["--workdir", bare, "--output", str(tmp_path / "pt_x"), "--with_centers"])


# ---- errors -----------------------------------------------------------------------------------

def _mutate_state(fn):
  def apply(d):
    path = os.path.join(d, layout_lib.MODEL_FILE)
    state = load_file(path)
    fn(state)
    save_file(state, path, metadata={"format": "pt"})
  return apply


def _mutate_config(fn):
  def apply(d):
    path = os.path.join(d, layout_lib.CONFIG_FILE)
    with open(path) as f:
      cfg = json.load(f)
    fn(cfg)
    with open(path, "w") as f:
      json.dump(cfg, f)
  return apply


def _write_centers(arr):
  def apply(d):
    save_file({"centers": arr}, os.path.join(d, layout_lib.CENTERS_FILE))
  return apply


_ERRORS = {
    "missing": (_mutate_state(lambda s: s.pop("encoder.layers.1.mlp.fc2.bias")),
                r"missing keys \['encoder.layers.1.mlp.fc2.bias'\]"),
    "renamed": (_mutate_state(lambda s: s.update({"head.norm.scale": s.pop("head.norm.weight")})),
                r"missing keys \['head.norm.weight'\]; unexpected keys \['head.norm.scale'\]"),
    "extra": (_mutate_state(lambda s: s.update({"head.attention.bias_k": np.zeros((1, 1, 128), np.float32)})),
              r"unexpected keys \['head.attention.bias_k'\]"),
    "shape": (_mutate_state(lambda s: s.update({"head.attention.in_proj_weight": s["head.attention.in_proj_weight"].T.copy()})),
              r"'head.attention.in_proj_weight' has shape \(128, 384\), expected \(384, 128\)"),
    "dtype": (_mutate_state(lambda s: s.update({"layernorm_pre.bias": np.zeros(128, np.int32)})),
              r"'layernorm_pre.bias' has dtype torch.int32"),
    "config_field": (_mutate_config(lambda c: c.pop("num_attention_heads")),
                     r"config.json: field 'num_attention_heads' is missing"),
    "config_act": (_mutate_config(lambda c: c.update(hidden_act="gelu_pytorch_tanh")),
                   r"field 'hidden_act'='gelu_pytorch_tanh' is not supported"),
    "config_sizes": (_mutate_config(lambda c: c.update(num_hidden_layers=3)),
                     r"missing keys \['encoder.layers.2.layer_norm1.weight'"),
    "no_weights": (lambda d: os.remove(os.path.join(d, layout_lib.MODEL_FILE)), r"model.safetensors not found"),
    "centers": (_write_centers(np.zeros((8, 64), np.float32)), r"'centers' has shape \(8, 64\)"),
}


@pytest.mark.parametrize("name", sorted(_ERRORS))
def test_import_errors_name_the_key(official, tmp_path, name):
  _, _, _, _, out_dir = official
  d = str(tmp_path / "pt")
  shutil.copytree(out_dir, d)
  mutate, message = _ERRORS[name]
  mutate(d)
  with pytest.raises((layout_lib.LayoutError, FileNotFoundError), match=message):
    import_torch.read_export(d)
  if name in ("missing", "shape", "config_field"):  # the PyTorch loader reports the same way
    with pytest.raises((layout_lib.LayoutError, FileNotFoundError), match=message):
      torch_model.OVEncoder.from_pretrained(d)


def test_export_errors_name_the_flax_leaf(official, tmp_path):
  _, _, params, _, _ = official
  bad = jax.tree.map(lambda a: a, params)
  del bad["layers_1"]["mlp"]["fc2"]["bias"]
  with pytest.raises(layout_lib.LayoutError, match="Flax params have no 'layers_1/mlp/fc2/bias'"):
    export_torch.export_params(bad, str(tmp_path / "a"))
  bad = jax.tree.map(lambda a: a, params)
  bad["head"]["extra"] = np.zeros(3, np.float32)
  with pytest.raises(layout_lib.LayoutError, match=r"no place for: \['head/extra'\]"):
    export_torch.export_params(bad, str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


# ---- the PyTorch module needs no jax ----------------------------------------------------------

def test_torch_module_imports_without_jax(official, tmp_path):
  _, _, _, model, out_dir = official
  frames = _photo_frames(2, 3, 3, seed=11)
  kept = np.array([[0, 0, 0], [0, 2, 1], [1, 1, 1], [1, 2, 2], [0, 1, 2]])
  np.save(tmp_path / "frames.npy", frames)
  np.save(tmp_path / "kept.npy", kept)
  code = (
      "import sys, numpy as np, torch\n"
      "from ovenc_jax.interop import torch_model\n"
      f"m = torch_model.load({out_dir!r})\n"
      f"frames, kept = np.load({str(tmp_path / 'frames.npy')!r}), np.load({str(tmp_path / 'kept.npy')!r})\n"
      "with torch.no_grad():\n"
      "  out = m.encode_video(torch.from_numpy(frames), torch.from_numpy(kept))\n"
      f"np.save({str(tmp_path / 'pooled.npy')!r}, out['pooled'].numpy())\n"
      "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('jax', 'jaxlib', 'flax', 'orbax', 'optax'))\n"
      "print('HEAVY', heavy)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "HEAVY []" in r.stdout, r.stdout
  with torch.no_grad():
    want = model.encode_video(frames, kept)["pooled"].numpy()
  # Same module and weights; a process with another torch thread count sums in another order.
  assert_reorder_close(np.load(tmp_path / "pooled.npy"), want)


def test_bad_inputs_are_named(official, tmp_path):
  _, _, params, model, _ = official
  x, pos, seg, _, _ = _case("float_mask")
  for kwargs, message in [
      (dict(patches=x[..., :100], positions=pos), r"patches has shape \(2, 36, 100\), expected \[B, N, 588\]"),
      (dict(patches=x, positions=pos[:, :, :2]), r"positions has shape \(2, 36, 2\)"),
      (dict(patches=x, positions=pos, segment_ids=seg[:, :5]), r"segment_ids has shape \(2, 5\)"),
      (dict(patches=x, positions=pos, segment_ids=seg, mask=seg > 0), "not both"),
      (dict(patches=x, positions=pos, mask=seg), "mask must be bool"),
      (dict(patches=x, positions=pos, num_segments=0), "num_segments=0"),
  ]:
    with pytest.raises(ValueError, match=message):
      model(**kwargs)
  with pytest.raises(layout_lib.LayoutError, match=r"centers has shape \(5, 3\)"):
    export_torch.export_params(params, str(tmp_path / "c"), centers=np.zeros((5, 3), np.float32))
  with pytest.raises(layout_lib.LayoutError, match="rope_layout='xy'"):
    export_torch.export_params(params, str(tmp_path / "c"), rope_layout="xy")
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    torch_model.OVEncoder.from_pretrained(str(tmp_path))
