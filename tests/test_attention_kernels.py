"""Attention kernels vs XLA's masked path: splash (interpret mode), its shard_map path, cuDNN's mask, `auto`.

cuDNN itself needs an NVIDIA GPU and there is none here: its tests check only what a CPU can, the
selection logic and that the call it makes (the same mask, through XLA's kernel) matches the reference.
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers.tolerances import assert_reorder_close
from tests.helpers import tpu_compile

from ovenc_jax.configs import common
from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.model import attention as attn_lib
from ovenc_jax.model import encoder as model_lib
from ovenc_jax import sharding as sharding_lib
from ovenc_jax.model.attention import cudnn, splash

# (fp32, bf16) tolerances from the issue; bf16 is relative to the output/gradient scale.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _packed(b, n, h, d, dtype, seed=0):
  """q/k/v and packed rows: 2-3 segments then zero padding; n need not be a multiple of 128."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, d)), dtype) for _ in range(3))
  rows = []
  for i in range(b):
    a, c = 40 + 17 * i, 60 + 9 * i
    rows.append([1] * a + [2] * c + [3] * (n - a - c - 20 - i) + [0] * (20 + i))
  return q, k, v, jnp.asarray(rows, jnp.int32)


def _loss_and_grads(impl, q, k, v, seg, **kw):
  def loss(q, k, v):
    o = attn_lib.dot_product_attention(q, k, v, seg, seg, impl=impl, **kw)
    # Padding rows are excluded, as the model's pooled output excludes them.
    return jnp.sum(jnp.sin(o.astype(jnp.float32)) * (seg[..., None, None] > 0)), o
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_splash_matches_xla_forward_and_grads(dtype):
  # 200 tokens: padded to 256 inside (its own segment id), so blocks of 128 cover the row.
  q, k, v, seg = _packed(2, 200, 2, 64, dtype)
  (l_ref, o_ref), g_ref = _loss_and_grads("xla", q, k, v, seg)
  (l_spl, o_spl), g_spl = _loss_and_grads("splash", q, k, v, seg)
  assert o_spl.dtype == dtype and o_spl.shape == q.shape
  real = np.asarray(seg > 0)
  _assert_close(np.asarray(o_spl, np.float32)[real], np.asarray(o_ref, np.float32)[real], TOL[dtype], "out")
  for name, a, b in zip("qkv", g_spl, g_ref):
    _assert_close(a, b, TOL[dtype], f"d{name}")
  if dtype == jnp.float32:  # padding tokens attend among themselves in both paths
    _assert_close(o_spl, o_ref, TOL[dtype], "out incl. padding")
  # The kernel's own [B, H, N, hd] layout (the model's projections write it): the same numbers.
  t = lambda x: x.swapaxes(1, 2)
  seg_hf = seg[:, None, :, None]

  def loss_hf(q, k, v):
    o = attn_lib.dot_product_attention(q, k, v, seg, seg, impl="splash", heads_first=True)
    return jnp.sum(jnp.sin(o.astype(jnp.float32)) * (seg_hf > 0)), o
  (l_hf, o_hf), g_hf = jax.jit(jax.value_and_grad(loss_hf, argnums=(0, 1, 2), has_aux=True))(t(q), t(k), t(v))
  assert o_hf.shape == t(q).shape
  _assert_close(t(o_hf)[real], np.asarray(o_ref, np.float32)[real], TOL[dtype], "out, heads first")
  for name, a, b in zip("qkv", g_hf, g_ref):
    _assert_close(t(a), b, TOL[dtype], f"d{name}, heads first")
  with pytest.raises(ValueError, match="not heads first"):
    attn_lib.dot_product_attention(q, k, v, seg, seg, impl="xla", heads_first=True)


def test_splash_block_sizes():
  assert splash.block_size(1024) == 512 and splash.block_size(384) == 128 and splash.block_size(768) == 256
  bs = splash.block_sizes(512)
  sizes = (bs.block_q, bs.block_kv, bs.block_kv_compute, bs.block_q_dkv, bs.block_kv_dkv, bs.block_kv_dkv_compute)
  assert all(s % 128 == 0 and 512 % s == 0 for s in sizes)
  with pytest.raises(ValueError, match="not a multiple of 128"):
    splash.block_size(200)
  q, k, v, seg = _packed(1, 130, 1, 32, jnp.float32)
  with pytest.raises(ValueError, match="self-attention"):
    splash.attention(q, k[:, :64], v[:, :64], seg, seg[:, :64], scale=1.0)


def _pallas_costs(jaxpr, out):
  """{kernel phase: cost_estimate} of every pallas_call in a (nested) jaxpr."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      name = str(eqn.params.get("name_and_src_info", eqn.params.get("name", "")))
      phase = next(p for p in ("fwd", "dkv", "dq") if f"_{p}" in name)
      out[phase] = eqn.params["cost_estimate"]
  for sub in jax.extend.core.subjaxprs(jaxpr):
    _pallas_costs(sub, out)
  return out


def test_splash_declares_block_counts_from_its_grids():
  # 384 tokens: 3 blocks of 128 each way; 2 heads, so a grid read in the wrong order gives 2.
  b, n, h, d = 2, 384, 2, 64
  q, k, v, seg = _packed(b, n, h, d, jnp.bfloat16)
  loss = lambda q, k, v: attn_lib.dot_product_attention(q, k, v, seg, seg, impl="splash").astype(
      jnp.float32).sum()
  costs = _pallas_costs(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr, {})
  assert set(costs) == {"fwd", "dkv"}  # the fused backward: no separate dq kernel
  # Counted by hand per row (vmap multiplies by the b rows): [H, S, d] bf16 tensors of 96 KiB; 3 blocks
  # each way, so every block index changes at every grid step that moves it.
  t, blocks = h * n * d * 2, 3
  lse_lanes = h * n * 128 * 4                 # the forward's fp32 logsumexp, 128 lanes wide
  q_ids_lanes = h * n * 128 * 4               # [S, 128] int32 q ids, re-read per head
  kv_ids_sublanes = h * blocks * n * 8 * 4    # [8, S] int32 k ids, re-read per (head, q block)
  fwd = t + 2 * blocks * t + t + lse_lanes + q_ids_lanes + kv_ids_sublanes
  dkv = (2 * t + blocks * (2 * t + 8 * h * n)  # k, v once; q, dO, logsumexp, di per key block
         + blocks * h * n * 8 * 4 + n * 128 * 4  # q ids [8, S] per (key block, head); k ids [S, 128] once
         + 2 * t + blocks * h * n * d * 4)     # dk, dv; fp32 dq partials per key block
  assert costs["fwd"].bytes_accessed == b * fwd
  assert costs["dkv"].bytes_accessed == b * dkv
  assert costs["fwd"].flops == b * 4 * h * n * n * d and costs["dkv"].flops == b * 10 * h * n * n * d


def test_splash_under_shard_map_matches_xla_single_device():
  """Splash per device inside shard_map on a 2x2x2 mesh (batch over data*fsdp, heads over tensor)
  vs the XLA path on one device: forward and gradients."""
  mesh = sharding_lib.make_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  rules = common.LOGICAL_AXIS_RULES
  q, k, v, seg = _packed(4, 256, 4, 32, jnp.float32, seed=1)
  (l1, o1), g1 = _loss_and_grads("xla", q, k, v, seg)
  with jax.set_mesh(mesh):
    put = lambda a: jax.device_put(a, sharding_lib.batch_sharding(mesh, a.ndim, rules))
    (l2, o2), g2 = _loss_and_grads("splash", *map(put, (q, k, v, seg)), axis_rules=rules)
  assert o2.sharding.spec[0] == ("data", "fsdp")
  assert_reorder_close(l2, l1)
  assert_reorder_close(o2, o1)
  g_scale = max(float(np.abs(np.asarray(g)).max()) for g in g1)
  for a, b in zip(g2, g1):
    assert_reorder_close(a, b, scale=g_scale)
  # The kernel's own [B, H, N, hd] layout, as the model feeds it, under the same mesh.
  t = lambda x: x.swapaxes(1, 2)

  def loss_hf(q, k, v):
    o = attn_lib.dot_product_attention(q, k, v, seg, seg, impl="splash", axis_rules=rules,
                                       heads_first=True)
    return jnp.sum(jnp.sin(o.astype(jnp.float32)) * (seg[:, None, :, None] > 0)), o
  with jax.set_mesh(mesh):
    (l3, o3), g3 = jax.jit(jax.value_and_grad(loss_hf, argnums=(0, 1, 2), has_aux=True))(
        *(put(t(x)) for x in (q, k, v)))
  assert o3.sharding.spec[0] == ("data", "fsdp")
  assert_reorder_close(l3, l1)
  assert_reorder_close(t(o3), o1)
  for a, b in zip(g3, g1):
    assert_reorder_close(t(a), b, scale=g_scale)


def test_model_dispatches_splash_inside_shard_map():
  """The encoder built with model.attention=splash and the training rules lowers its self-attention
  to a per-device shard_map (Mosaic kernels are not partitioned by XLA); batch 1 (the example that
  initialises parameters under the training mesh) is left unsplit."""
  cfg = model_defaults.model_config("tiny")
  cfg.update(depth=1, attention="splash")
  enc = model_lib.encoder_from_config(cfg, common.LOGICAL_AXIS_RULES)
  mesh = sharding_lib.make_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  x = jnp.zeros((4, 128, 14 * 14 * 3), jnp.uint8)
  pos, seg = jnp.zeros((4, 128, 3), jnp.int32), jnp.ones((4, 128), jnp.int32)
  with jax.set_mesh(mesh):
    params = jax.eval_shape(lambda r: enc.init(r, x[:1], pos[:1], seg[:1]), jax.random.key(0))
    text = jax.jit(enc.apply).lower(params, x, pos, seg).as_text()
  assert text.count("sdy.manual_computation") == 1, "one shard_map: the one self-attention layer"


def _encoder_loss_and_grads(cfg, impls, segments):
  """{impl: (loss, parameter gradients)} of the encoder with model.attention=impl, one set of
  parameters (initialised on the first impl), random patches and positions on the given rows."""
  seg = jnp.asarray(segments, jnp.int32)
  b, n = seg.shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, size=(b, n, 14 * 14 * 3)), jnp.uint8)
  pos = jnp.asarray(rng.integers(0, 8, size=(b, n, 3)), jnp.int32)
  outs, params = {}, None
  for impl in impls:
    cfg.attention = impl
    enc = model_lib.encoder_from_config(cfg)
    params = enc.init(jax.random.key(0), x, pos, seg) if params is None else params

    def loss(p):
      out = enc.apply(p, x, pos, seg)
      h = out["last_hidden_state"].astype(jnp.float32)
      return jnp.sum(jnp.sin(h) * (seg[..., None] > 0)) + jnp.sum(out["pooled"].astype(jnp.float32))
    outs[impl] = jax.jit(jax.value_and_grad(loss))(params)
  return outs


@pytest.mark.slow
def test_encoder_splash_path_matches_xla_path():
  """The same parameters through model.attention=splash (projections writing [B, H, N, hd], RoPE on
  that layout, the kernel in interpret mode) and through XLA's [B, N, H, hd] path: outputs and every
  parameter's gradient agree."""
  cfg = model_defaults.model_config("tiny")
  cfg.update(depth=1)
  outs = _encoder_loss_and_grads(cfg, ("xla", "splash"),
                                 [[1] * 70 + [2] * 50 + [0] * 8, [1] * 100 + [0] * 28])
  (l_x, g_x), (l_s, g_s) = outs["xla"], outs["splash"]
  np.testing.assert_allclose(l_s, l_x, rtol=1e-5)
  # Against the largest gradient anywhere: some are exactly 0 in exact arithmetic (a key bias under
  # the softmax), rounding noise in both paths.
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g_x))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree.leaves(g_x)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_cudnn_call_matches_xla_reference():
  """The cuDNN path's call (segment mask -> bias) run through XLA's kernel; cuDNN numerics need a GPU."""
  q, k, v, seg = _packed(2, 150, 2, 64, jnp.bfloat16)
  scale = 64 ** -0.5
  got = jax.jit(lambda *a: cudnn.attention(*a, scale=scale, implementation="xla"))(q, k, v, seg, seg)
  # Reference: numpy softmax over same-segment keys, in float64.
  qf, kf, vf = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
  same = np.asarray(seg)[:, None, :, None] == np.asarray(seg)[:, None, None, :]
  logits = np.where(same, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), vf)
  _assert_close(got, want, TOL[jnp.bfloat16], "cudnn call via xla")


def _one_sample_rows(n, h, d, dtype, seed=0):
  """q/k/v and rows of one sample then padding, one row empty (all padding)."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(3, n, h, d)), dtype) for _ in range(3))
  lengths = [n - 37, n, 0]
  seg = jnp.asarray([[1] * m + [0] * (n - m) for m in lengths], jnp.int32)
  return q, k, v, seg


def test_cudnn_one_sample_rows_call_matches_mask_path():
  """The cuDNN path's sequence-length call (rows of one sample) run through XLA's kernel: real tokens'
  outputs and the q, k, v gradients of a loss over them equal the mask path's; padding outputs are 0."""
  q, k, v, seg = _one_sample_rows(150, 2, 64, jnp.float32)
  scale = 64 ** -0.5
  real = seg[..., None, None] > 0

  def run(one_sample_rows):
    def loss(q, k, v):
      o = cudnn.attention(q, k, v, seg, seg, scale=scale, implementation="xla", one_sample_rows=one_sample_rows)
      return jnp.sum(jnp.sin(o) * real), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

  (l_len, o_len), g_len = run(True)
  (l_mask, o_mask), g_mask = run(False)
  np.testing.assert_allclose(l_len, l_mask, rtol=1e-5)
  keep = np.asarray(real)[..., 0, 0]
  np.testing.assert_allclose(np.asarray(o_len)[keep], np.asarray(o_mask)[keep], rtol=1e-5, atol=1e-6)
  # Past each row's length (an empty row counts one token) the outputs are zeros.
  counted = np.arange(seg.shape[1])[None, :] < np.maximum(keep.sum(1), 1)[:, None]
  assert not np.asarray(o_len)[~counted].any(), "queries past a row's length give zeros"
  assert np.isfinite(np.asarray(o_len)).all()
  for name, a, b in zip("qkv", g_len, g_mask):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()), err_msg=f"d{name}")
    assert np.isfinite(np.asarray(a)).all()


@pytest.mark.gpu  # cuDNN numerics need a GPU
def test_cudnn_one_sample_rows_matches_xla_on_gpu():
  """cuDNN flash attention with sequence lengths against XLA's masked kernel, bf16, on the GPU: real
  tokens agree, and nothing past a row's length (its outputs, its gradients) is non-finite."""
  q, k, v, seg = _one_sample_rows(512, 4, 64, jnp.bfloat16)
  (_, o_ref), g_ref = _loss_and_grads("xla", q, k, v, seg)
  (_, o_cud), g_cud = _loss_and_grads("cudnn", q, k, v, seg, one_sample_rows=True)
  real = np.asarray(seg > 0)
  _assert_close(np.asarray(o_cud, np.float32)[real], np.asarray(o_ref, np.float32)[real], TOL[jnp.bfloat16], "out")
  assert np.isfinite(np.asarray(o_cud, np.float32)).all()
  for name, a, b in zip("qkv", g_cud, g_ref):
    a = np.asarray(a, np.float32)
    assert np.isfinite(a).all(), f"d{name}"
    _assert_close(a[real], np.asarray(b, np.float32)[real], TOL[jnp.bfloat16], f"d{name}")


@pytest.mark.gpu  # cuDNN numerics need a GPU
@pytest.mark.parametrize("n", [150, 512])
def test_cudnn_matches_xla_forward_and_grads_on_gpu(n):
  """cuDNN flash attention on packed rows with padding against XLA's kernel, bf16, on the GPU."""
  q, k, v, seg = _packed(2, n, 4, 64, jnp.bfloat16)
  (_, o_ref), g_ref = _loss_and_grads("xla", q, k, v, seg)
  (_, o_cud), g_cud = _loss_and_grads("cudnn", q, k, v, seg)
  real = np.asarray(seg > 0)
  assert o_cud.dtype == jnp.bfloat16 and o_cud.shape == q.shape
  _assert_close(np.asarray(o_cud, np.float32)[real], np.asarray(o_ref, np.float32)[real], TOL[jnp.bfloat16],
                "out")
  for name, a, b in zip("qkv", g_cud, g_ref):
    _assert_close(a, b, TOL[jnp.bfloat16], f"d{name}")


@pytest.mark.gpu  # cuDNN numerics need a GPU
def test_encoder_cudnn_path_matches_xla_path_on_gpu():
  """The bf16 encoder through model.attention=cudnn and through XLA's attention, same parameters."""
  cfg = model_defaults.model_config("tiny")
  cfg.update(depth=2, dtype="bfloat16")
  outs = _encoder_loss_and_grads(cfg, ("xla", "cudnn"),
                                 [[1] * 130 + [2] * 100 + [0] * 26, [1] * 200 + [0] * 56])
  (l_x, g_x), (l_c, g_c) = outs["xla"], outs["cudnn"]
  np.testing.assert_allclose(l_c, l_x, rtol=2e-2)
  # Each leaf against its own scale, floored at 5% of the largest gradient: some (a key bias under the
  # softmax) are 0 in exact arithmetic and bf16 rounding noise in both paths.
  top = max(float(np.abs(np.asarray(g, np.float32)).max()) for g in jax.tree.leaves(g_x))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_c), jax.tree.leaves(g_x)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = max(float(np.abs(b).max()), 0.05 * top)
    np.testing.assert_allclose(a, b, rtol=TOL[jnp.bfloat16], atol=TOL[jnp.bfloat16] * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_auto_picks_per_platform_and_rejects_bad_choices():
  assert attn_lib.resolve("auto", "tpu") == "splash"
  assert attn_lib.resolve("auto", "cpu", "bfloat16") == "xla"
  assert attn_lib.resolve("auto", "gpu", "bfloat16") == "cudnn"
  assert attn_lib.resolve("auto", "cuda", jnp.float16) == "cudnn"
  assert attn_lib.resolve("auto", "gpu", "float32") == "xla"  # cuDNN flash is half precision only
  assert attn_lib.resolve("chunked", "tpu") == "chunked"
  with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype"):
    attn_lib.resolve("cudnn", "gpu", "float32")
  with pytest.raises(ValueError, match="model.attention='flash'"):
    attn_lib.resolve("flash", "tpu")
  cfg = model_defaults.model_config("tiny")
  assert cfg.attention == "auto"
  assert model_lib.encoder_from_config(cfg, platform="tpu").attention == "splash"
  assert model_lib.encoder_from_config(cfg).attention == "xla"  # this machine is a CPU


_TPU_COMPILE = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from ovenc_jax.configs import common
from ovenc_jax.model import attention as attn_lib
devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
mesh = jax.sharding.Mesh(np.asarray(devices).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
def loss(q, k, v, seg):
  o = attn_lib.dot_product_attention(q, k, v, seg, seg, impl="splash", axis_rules=common.LOGICAL_AXIS_RULES)
  return jnp.sum(o.astype(jnp.float32))
qkv = jax.ShapeDtypeStruct((4, 1024, 4, 64), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None)))
seg = jax.ShapeDtypeStruct((4, 1024), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
with jax.set_mesh(mesh):
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, seg).compile()
text = compiled.as_text()
print("MOSAIC_CALLS", text.count('custom_call_target="tpu_custom_call"'))
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
print("COST", cost["flops"], cost["bytes accessed"])
"""


def test_splash_compiles_for_a_tpu_target_as_mosaic_kernels():
  """Deviceless compile for a v5e 2x2 slice from this CPU host: forward and fused backward are Mosaic
  kernels (not the interpreter, although the local backend is the CPU), partitioned by shard_map."""
  stdout = tpu_compile.run(_TPU_COMPILE)
  assert "MOSAIC_CALLS 2" in stdout, stdout
  # Each device runs 2 rows x 2 heads of 1,024 tokens, blocks of 512: the kernels declare their work.
  flops, accessed = map(float, stdout.split("COST")[1].split())
  rows_heads, n, d, e = 2 * 2, 1024, 64, 2
  kernel_flops = rows_heads * (4 + 10) * n * n * d
  assert kernel_flops <= flops <= 1.2 * kernel_flops, (flops, kernel_flops)
  # K/V re-read per query block (2) in the forward, q/dO per key block in the backward, dq in fp32.
  streamed = rows_heads * n * d * (e * (1 + 2 * 2 + 1) + e * (2 + 2 * 2 + 2) + 4 * 2)
  assert accessed >= streamed, (accessed, streamed)
