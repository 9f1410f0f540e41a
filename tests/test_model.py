"""Encoder tests: padding/packing invariance, RoPE relativity and numpy reference, sharding, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_sample_image
from tests.helpers.tolerances import assert_reorder_close

from ovenc_jax.configs import common
from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.configs import pretrain
from ovenc_jax.model import attention as attn_lib
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.model import rope as rope_lib
from ovenc_jax import sharding as sharding_lib

P = 14


def _image_tokens(n, seed=0, t_max=4):
  """n real-photo patches (uint8, flattened p*p*3) with random distinct (t, h, w) positions."""
  img = load_sample_image("china.jpg")[: 16 * P, : 16 * P]
  grid = img.reshape(16, P, 16, P, 3).transpose(0, 2, 1, 3, 4).reshape(256, P * P * 3)
  rng = np.random.default_rng(seed)
  cells = rng.choice(t_max * 256, size=n, replace=False)
  t, hw = np.divmod(cells, 256)
  h, w = np.divmod(hw, 16)
  patches = grid[(hw + 37 * t) % 256]  # different content per frame
  return patches.astype(np.uint8), np.stack([t, h, w], -1).astype(np.int32)


def _tiny(**overrides):
  cfg = model_defaults.model_config("tiny")
  cfg.update(overrides)
  return model_lib.encoder_from_config(cfg)


def _run(enc, params, patches, positions, segments, num_segments=1):
  return enc.apply(params, jnp.asarray(patches)[None] if patches.ndim == 2 else patches,
                   jnp.asarray(positions)[None] if positions.ndim == 2 else positions,
                   jnp.asarray(segments)[None] if segments.ndim == 1 else segments,
                   num_segments=num_segments)


@pytest.fixture(scope="module", params=["official", "consistent"])
def enc_params(request):
  enc = _tiny(rope_layout=request.param)
  x, pos = _image_tokens(24)
  params = enc.init(jax.random.key(1), x[None], pos[None], np.ones((1, 24), np.int32))
  return enc, params


def test_padding_invariance(enc_params):
  enc, params = enc_params
  x, pos = _image_tokens(24)
  base = _run(enc, params, x, pos, np.ones(24, np.int32))
  rng = np.random.default_rng(3)
  # 9 padding tokens with random content and positions, spliced in at random places.
  pad_x = rng.integers(0, 255, size=(9, x.shape[1])).astype(np.uint8)
  pad_pos = rng.integers(0, 50, size=(9, 3)).astype(np.int32)
  order = rng.permutation(33)
  xs = np.concatenate([x, pad_x])[order]
  ps = np.concatenate([pos, pad_pos])[order]
  seg = np.concatenate([np.ones(24, np.int32), np.zeros(9, np.int32)])[order]
  padded = _run(enc, params, xs, ps, seg)
  real = np.argsort(order)[:24]
  np.testing.assert_allclose(padded["last_hidden_state"][0, real], base["last_hidden_state"][0], atol=1e-5)
  np.testing.assert_allclose(padded["pooled"], base["pooled"], atol=1e-5)


def test_packing_equals_separate_runs(enc_params):
  enc, params = enc_params
  xa, pa = _image_tokens(20, seed=1)
  xb, pb = _image_tokens(13, seed=2)
  alone_a = _run(enc, params, xa, pa, np.ones(20, np.int32))
  alone_b = _run(enc, params, xb, pb, np.ones(13, np.int32))
  packed = _run(enc, params, np.concatenate([xa, xb, xa[:3]]), np.concatenate([pa, pb, pa[:3]]),
                np.concatenate([np.full(20, 1), np.full(13, 2), np.zeros(3)]).astype(np.int32),
                num_segments=2)
  h = packed["last_hidden_state"][0]
  np.testing.assert_allclose(h[:20], alone_a["last_hidden_state"][0], atol=1e-5)
  np.testing.assert_allclose(h[20:33], alone_b["last_hidden_state"][0], atol=1e-5)
  np.testing.assert_allclose(packed["pooled"][0, 0], alone_a["pooled"][0, 0], atol=1e-5)
  np.testing.assert_allclose(packed["pooled"][0, 1], alone_b["pooled"][0, 0], atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rope_is_relative_consistent_layout(axis):
  enc = _tiny(rope_layout="consistent")
  x, pos = _image_tokens(24)
  seg = np.ones(24, np.int32)
  params = enc.init(jax.random.key(0), x[None], pos[None], seg[None])
  base = _run(enc, params, x, pos, seg)
  shifted = pos.copy()
  shifted[:, axis] += 11
  out = _run(enc, params, x, shifted, seg)
  # Absolute positions up to ~27 enter through fp32 cos/sin: relative only up to rounding.
  np.testing.assert_allclose(out["last_hidden_state"], base["last_hidden_state"], atol=2e-4)
  np.testing.assert_allclose(out["pooled"], base["pooled"], atol=2e-4)


def test_official_layout_is_not_shift_invariant():
  # The official pairing rotates (2i, 2i+1) by two different angles, so it is not a pure
  # rotation and depends on absolute position: the documented difference between the layouts.
  enc = _tiny(rope_layout="official")
  x, pos = _image_tokens(24)
  seg = np.ones(24, np.int32)
  params = enc.init(jax.random.key(0), x[None], pos[None], seg[None])
  shifted = pos + np.array([0, 5, 0], np.int32)
  diff = np.abs(_run(enc, params, x, shifted, seg)["pooled"] - _run(enc, params, x, pos, seg)["pooled"])
  assert diff.max() > 1e-3


def test_permutation_equivariance(enc_params):
  enc, params = enc_params
  x, pos = _image_tokens(24)
  seg = np.ones(24, np.int32)
  perm = np.random.default_rng(5).permutation(24)
  base = _run(enc, params, x, pos, seg)
  out = _run(enc, params, x[perm], pos[perm], seg)
  np.testing.assert_allclose(out["last_hidden_state"][0], base["last_hidden_state"][0, perm], atol=1e-5)
  np.testing.assert_allclose(out["pooled"], base["pooled"], atol=1e-5)


def _numpy_rope(x, pos, layout):
  """Independent reference, written per pair with explicit loops."""
  n, hd = x.shape
  half = hd // 2
  counts = [half * 4 // 16, half * 6 // 16, half * 6 // 16]
  out = np.zeros_like(x)
  for r in range(n):
    freqs = []
    for axis, c in enumerate(counts):
      freqs += [pos[r, axis] / 10000.0 ** (i / c) for i in range(c)]
    ang = freqs + freqs
    for j in range(0, hd, 2) if layout == "official" else range(half):
      if layout == "official":
        a, b = j, j + 1
      else:
        a, b = j, j + half
      out[r, a] = x[r, a] * np.cos(ang[a]) - x[r, b] * np.sin(ang[a])
      out[r, b] = x[r, b] * np.cos(ang[b]) + x[r, a] * np.sin(ang[b])
  return out


@pytest.mark.parametrize("layout", ["official", "consistent"])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_rope_matches_numpy(layout, head_dim):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, head_dim)).astype(np.float64)
  pos = rng.integers(0, 30, size=(7, 3))
  angles = rope_lib.rope_angles(jnp.asarray(pos)[None], head_dim)
  got = rope_lib.apply_rope(jnp.asarray(x, jnp.float32)[None, :, None, :], angles, layout)[0, :, 0]
  np.testing.assert_allclose(got, _numpy_rope(x, pos, layout), atol=1e-5)
  if head_dim == 64:  # the stated split: 8/12/12 frequencies
    assert [len(f) for f in rope_lib.axis_frequencies(64)] == [8, 12, 12]


@pytest.mark.parametrize("layout", ["official", "consistent"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_rotation_by_matmul_is_exact(layout, dtype):
  """The TPU path (rotate_half as x @ R) equals the shuffle bit for bit, values and gradients."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, 3, 64)), dtype)
  shuffle = {"official": rope_lib._rotate_half_interleaved, "consistent": rope_lib._rotate_half_split}[layout]
  f_mm = lambda x: rope_lib._rotate_by_matmul(x, layout)
  f_sh = lambda x: shuffle(x.astype(jnp.float32))
  np.testing.assert_array_equal(f_mm(x), f_sh(x))
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  g_mm, g_sh = (jax.grad(lambda x, f=f: jnp.sum(f(x) * w))(x) for f in (f_mm, f_sh))
  np.testing.assert_array_equal(g_mm, g_sh)


def test_chunked_attention_matches_dense_with_grads():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 70, 4, 32)), jnp.float32) for _ in range(3))
  seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 25 + [0] * 5], 2, 0), jnp.int32)

  def loss(impl, q, k, v):
    o = attn_lib.dot_product_attention(q, k, v, seg, seg, impl=impl, chunk_size=16)
    return jnp.sum(jnp.sin(o) * (seg[..., None, None] > 0)), o

  (l1, o1), g1 = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  (l2, o2), g2 = jax.value_and_grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(o2, o1, atol=1e-5)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_uint8_input_is_clip_normalised():
  enc = _tiny()
  x, pos = _image_tokens(10)
  seg = np.ones(10, np.int32)
  params = enc.init(jax.random.key(0), x[None], pos[None], seg[None])
  flt = (x.reshape(10, -1, 3) / 255.0 - model_lib.CLIP_MEAN) / model_lib.CLIP_STD
  a = _run(enc, params, x, pos, seg)["pooled"]
  b = _run(enc, params, flt.reshape(10, -1).astype(np.float32), pos, seg)["pooled"]
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("data,fsdp,tensor", [(2, 2, 2), pytest.param(1, 8, 1, marks=pytest.mark.slow)])
def test_sharded_forward_and_grad_match_single_device(data, fsdp, tensor):
  """FSDP (weights gathered before use, gradients reduce-scattered), tensor and data parallelism."""
  cfg = pretrain.get_config("variant=tiny")
  cfg.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
  mesh = sharding_lib.make_mesh(cfg.mesh)
  sharding_lib.validate_divisibility(cfg.model, mesh)
  rules = cfg.logical_axis_rules
  enc_sharded = model_lib.encoder_from_config(cfg.model, rules)
  enc_plain = model_lib.encoder_from_config(cfg.model)
  xs, ps, segs = [], [], []
  for s in range(8):  # one row per batch shard at least: the reduce-scatter path needs them all
    x, p = _image_tokens(30, seed=s)
    xs.append(x), ps.append(p)
    segs.append(np.r_[np.ones(24 + s % 4, np.int32), np.zeros(6 - s % 4, np.int32)])
  x, pos, seg = (jnp.asarray(np.stack(a)) for a in (xs, ps, segs))
  init = lambda r: enc_sharded.init(r, x, pos, seg)
  with jax.set_mesh(mesh):
    params, shardings = sharding_lib.create_sharded(init, mesh, rules, jax.random.key(0))
  kernel = params["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len({s.data.unsafe_buffer_pointer() for s in kernel.addressable_shards}) == 8
  assert kernel.addressable_shards[0].data.shape == (128 // fsdp, 4 // tensor, 32)
  fc1 = params["params"]["layers_1"]["mlp"]["fc1"]["kernel"]
  assert fc1.addressable_shards[0].data.shape == (128 // fsdp, 512 // tensor)

  def loss(p, enc, x, pos, seg):
    out = enc.apply(p, x, pos, seg)
    return jnp.mean(out["pooled"] ** 2) + jnp.mean(out["last_hidden_state"] ** 3), out["pooled"]

  host_params = jax.device_get(params)
  single = jax.devices()[0]
  with jax.default_device(single):
    p1 = jax.device_put(host_params, single)
    (l1, pooled1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, enc_plain, x, pos, seg), has_aux=True))(p1)
  bs = sharding_lib.batch_sharding(mesh, 3, rules)
  with jax.set_mesh(mesh):
    xs_, ps_ = jax.device_put(x, bs), jax.device_put(pos, bs)
    ss_ = jax.device_put(seg, sharding_lib.batch_sharding(mesh, 2, rules))
    step = jax.jit(jax.value_and_grad(lambda p, a, b, c: loss(p, enc_sharded, a, b, c), has_aux=True),
                   out_shardings=((None, None), shardings))
    (l2, pooled2), g2 = step(params, xs_, ps_, ss_)
  assert g2["params"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  # Sharded vs one device: another reduction order, so fp32 rounding apart (tests/tolerances.py).
  assert_reorder_close(pooled2, pooled1)
  assert_reorder_close(l2, l1)
  g_scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: assert_reorder_close(a, b, scale=g_scale), g2, g1)


@pytest.mark.parametrize("mesh_kw, device_count, message", [
    (dict(data=3, fsdp=1, tensor=1), 8, "3*1*1 = 3 != 8"),
    (dict(data=-1, fsdp=3, tensor=1), 8, "mesh.data=-1 cannot fill"),
    (dict(data=-1, fsdp=-1, tensor=1), 8, "only one axis may be -1"),
    (dict(data=0, fsdp=1, tensor=1), 8, "mesh.data=0"),
])
def test_mesh_errors(mesh_kw, device_count, message):
  with pytest.raises(ValueError, match=message.replace("*", r"\*")):
    sharding_lib.mesh_shape(common.mesh_config(**mesh_kw), device_count)


def test_divisibility_and_model_errors():
  cfg = pretrain.get_config("tiny")
  cfg.mesh.update(dict(data=1, fsdp=1, tensor=8))
  mesh = sharding_lib.make_mesh(cfg.mesh)
  with pytest.raises(ValueError, match=r"model.num_heads=4 is not divisible by mesh.tensor=8"):
    sharding_lib.validate_divisibility(cfg.model, mesh)
  for key, value, message in [("num_heads", 3, "not divisible by model.num_heads"),
                              ("rope_layout", "xy", "model.rope_layout"),
                              ("attention", "flash", "model.attention"),
                              ("remat", "all", "model.remat"),
                              ("width", 4 * 40, "head_dim=40")]:
    bad = model_defaults.model_config("tiny")
    bad[key] = value
    with pytest.raises(ValueError, match=message):
      model_lib.encoder_from_config(bad)
  with pytest.raises(ValueError, match="variant='giant'"):
    pretrain.get_config("variant=giant")
  with pytest.raises(ValueError, match="config arg 'frames' is unknown"):
    pretrain.get_config("frames=8")
  assert pretrain.get_config("base").model.width == 768
