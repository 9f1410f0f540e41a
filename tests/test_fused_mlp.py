"""The fused LayerNorm -> MLP -> residual kernel (ovenc_jax/model/fused_mlp.py) vs plain jnp and vs the model's
XLA path: forward and gradients in interpret mode, on 8 host devices under FSDP, and as Mosaic kernels
compiled for a TPU target."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers.tolerances import assert_reorder_close
from tests.helpers import tpu_compile

from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.configs import pretrain
from ovenc_jax.model import fused_mlp
from ovenc_jax.model import encoder as model_lib
from ovenc_jax import sharding as sharding_lib

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # bf16: relative to the output/gradient scale
EPS = 1e-6


def _plain(x, s, c, w1, b1, w2, b2):
  """The block written out independently: float32 LayerNorm, exact GELU, residual."""
  x = x.astype(jnp.float32)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  h = ((x - mu) / jnp.sqrt(var + EPS) * s + c) @ w1 + b1
  return x + jax.nn.gelu(h, approximate=False) @ w2 + b2


def _operands(b, n, d, f, dtype, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
  x = normal(b, n, d).astype(dtype)
  params = (1 + normal(d, scale=0.1), normal(d, scale=0.1), normal(d, f, scale=d ** -0.5),
            normal(f, scale=0.1), normal(f, d, scale=f ** -0.5), normal(d, scale=0.1))
  return x, params, normal(b, n, d)


def _close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()), err_msg=what)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_plain_block_forward_and_grads(dtype):
  # 2 x 300 tokens: two grid steps of 512 rows, the second mostly padding, so the weight-gradient
  # sums carry across steps and padded rows must add nothing.
  x, params, dy = _operands(2, 300, 128, 256, dtype)
  fused = lambda x, *p: fused_mlp.mlp_block(x, *p, eps=EPS, compute_dtype=dtype)
  y, vjp = jax.vjp(fused, x, *params)
  want, vjp_want = jax.vjp(_plain, x.astype(jnp.float32), *params)
  assert y.dtype == dtype and y.shape == x.shape
  _close(y, want, TOL[dtype], "y")
  names = ("dx", "ln scale", "ln bias", "fc1 kernel", "fc1 bias", "fc2 kernel", "fc2 bias")
  for name, g, g_want in zip(names, vjp(dy.astype(dtype)), vjp_want(dy)):
    assert g.shape == g_want.shape, name
    _close(g, g_want, TOL[dtype], name)


def _tiny_inputs(b, n, seed=0):
  rng = np.random.default_rng(seed)
  patches = jnp.asarray(rng.integers(0, 256, size=(b, n, 14 * 14 * 3)), jnp.uint8)
  pos = jnp.asarray(np.stack([rng.integers(0, 4, (b, n)), rng.integers(0, 16, (b, n)),
                              rng.integers(0, 16, (b, n))], -1), jnp.int32)
  seg = jnp.asarray([[1] * (n - 3 - i % 3) + [0] * (3 + i % 3) for i in range(b)], jnp.int32)
  return patches, pos, seg


def _loss(enc):
  def loss(p, x, pos, seg):
    out = enc.apply(p, x, pos, seg)
    return jnp.mean(out["pooled"] ** 2) + jnp.mean(out["last_hidden_state"] ** 3), out["pooled"]
  return jax.value_and_grad(loss, has_aux=True)


@pytest.mark.slow
def test_model_pallas_path_matches_xla_path_on_the_same_parameters():
  cfg = model_defaults.model_config("tiny")
  x, pos, seg = _tiny_inputs(2, 40)
  cfg.mlp_kernel = "xla"
  enc_xla = model_lib.encoder_from_config(cfg)
  cfg.mlp_kernel = "pallas"
  enc_pallas = model_lib.encoder_from_config(cfg)
  assert (enc_xla.mlp_kernel, enc_pallas.mlp_kernel) == ("xla", "pallas")
  params = enc_xla.init(jax.random.key(0), x, pos, seg)
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
  assert shapes(enc_pallas.init(jax.random.key(0), x, pos, seg)) == shapes(params)  # checkpoints, exports
  (l1, pooled1), g1 = jax.jit(_loss(enc_xla))(params, x, pos, seg)
  (l2, pooled2), g2 = jax.jit(_loss(enc_pallas))(params, x, pos, seg)
  _close(pooled2, pooled1, 1e-5, "pooled")
  _close(l2, l1, 1e-5, "loss")
  g_scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * g_scale), g2, g1)


@pytest.mark.slow
@pytest.mark.parametrize("data,fsdp", [(2, 4), (1, 8)])
def test_sharded_pallas_path_matches_single_device_xla_path(data, fsdp):
  """Kernel per device in shard_map, weights gathered, gradients reduce-scattered into their shards."""
  cfg = pretrain.get_config("variant=tiny")
  cfg.mesh.update(dict(data=data, fsdp=fsdp, tensor=1))
  mesh = sharding_lib.make_mesh(cfg.mesh)
  rules = cfg.logical_axis_rules
  enc_plain = model_lib.encoder_from_config(cfg.model)
  cfg.model.mlp_kernel = "pallas"
  enc_sharded = model_lib.encoder_from_config(cfg.model, rules)
  x, pos, seg = _tiny_inputs(8, 30, seed=3)
  with jax.set_mesh(mesh):
    params, shardings = sharding_lib.create_sharded(
        lambda r: enc_sharded.init(r, x, pos, seg), mesh, rules, jax.random.key(0))
  single = jax.devices()[0]
  with jax.default_device(single):
    p1 = jax.device_put(jax.device_get(params), single)
    (l1, pooled1), g1 = jax.jit(_loss(enc_plain))(p1, x, pos, seg)
  bs = lambda nd: sharding_lib.batch_sharding(mesh, nd, rules)
  with jax.set_mesh(mesh):
    step = jax.jit(_loss(enc_sharded), out_shardings=((None, None), shardings))
    args = (params, jax.device_put(x, bs(3)), jax.device_put(pos, bs(3)), jax.device_put(seg, bs(2)))
    traced = str(jax.make_jaxpr(step)(*args))
    (l2, pooled2), g2 = step(*args)
  assert traced.count("name=fused_mlp_bwd") == 2 and traced.count("shard_map") >= 4, "kernel not used"
  fc1 = g2["params"]["layers_1"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert fc1.addressable_shards[0].data.shape == (128 // fsdp, 512)
  assert_reorder_close(pooled2, pooled1)
  assert_reorder_close(l2, l1)
  g_scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: assert_reorder_close(a, b, scale=g_scale), g2, g1)


def test_choice_per_platform_and_errors():
  cfg = model_defaults.model_config("tiny")
  assert cfg.mlp_kernel == "auto"
  whole = (jax.P(None), jax.P(None), jax.P("fsdp", "tensor"), jax.P("tensor"), jax.P("tensor", "fsdp"),
           jax.P("fsdp"))
  base = (768, 3072, "bfloat16")
  assert fused_mlp.auto_picks_kernel("tpu", whole, ("data", "fsdp"), *base)
  assert fused_mlp.auto_picks_kernel("tpu", whole, ("data", "fsdp"), 1024, 4096, "bfloat16")  # large
  assert not fused_mlp.auto_picks_kernel("tpu", whole, ("data", "fsdp"), 1280, 5120, "bfloat16")  # huge
  assert not fused_mlp.auto_picks_kernel("gpu", whole, ("data", "fsdp"), *base)
  assert not fused_mlp.auto_picks_kernel("cpu", None, None, *base)
  with jax.set_mesh(jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))):
    assert fused_mlp.split_axes(whole, ("data", "fsdp")) == ["tensor"]
    assert not fused_mlp.auto_picks_kernel("tpu", whole, ("data", "fsdp"), *base)
  # Blocks: base keeps 512 tokens a step, large drops to 128 to fit v5p's VMEM, huge does not fit.
  assert fused_mlp.token_block(2048, 768, 3072, 2) == 512
  assert fused_mlp.token_block(8192, 1024, 4096, 2) == 128
  assert fused_mlp.token_block(60, 768, 3072, 2) == 64
  assert fused_mlp.token_block(8192, 1280, 5120, 2) is None
  x, params, _ = _operands(1, 16, 1280, 5120, jnp.bfloat16)
  with pytest.raises(ValueError, match="mlp_dim 5120 .* MiB of VMEM.*model.mlp_kernel='xla'"):
    fused_mlp.mlp_block(x, *params, eps=EPS, compute_dtype=jnp.bfloat16)
  cfg.mlp_kernel = "triton"
  with pytest.raises(ValueError, match="model.mlp_kernel='triton'"):
    model_lib.encoder_from_config(cfg)
  # Tensor parallelism splits the MLP's hidden axis, which the kernel keeps whole.
  pc = pretrain.get_config("variant=tiny")
  pc.mesh.update(dict(data=2, fsdp=2, tensor=2))
  pc.model.mlp_kernel = "pallas"
  mesh = sharding_lib.make_mesh(pc.mesh)
  enc = model_lib.encoder_from_config(pc.model, pc.logical_axis_rules)
  x, pos, seg = _tiny_inputs(4, 20)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"\['tensor'\] split them.*model.mlp_kernel='xla'"):
    jax.eval_shape(lambda r: enc.init(r, x, pos, seg), jax.random.key(0))


_TPU_COMPILE = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from ovenc_jax.model import fused_mlp
devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", chip_config_name="default",
                                      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
mesh = jax.sharding.Mesh(np.asarray(devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
specs = (P(None), P(None), P("fsdp", "tensor"), P("tensor"), P("tensor", "fsdp"), P("fsdp"))
D, F = 256, 1024
def loss(x, *p):
  y = fused_mlp.mlp_block(x, *p, eps=1e-6, compute_dtype="bfloat16", stored_specs=specs,
                          batch_axes=("data", "fsdp"))
  return jnp.sum(y.astype(jnp.float32) ** 2)  # the gradient needs y: both kernels run
sd = lambda shape, dt, spec: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))
x = sd((8, 512, D), jnp.bfloat16, P(("data", "fsdp"), None, None))
ps = [sd(s, jnp.float32, sp) for s, sp in zip([(D,), (D,), (D, F), (F,), (F, D), (D,)], specs)]
with jax.set_mesh(mesh):
  compiled = jax.jit(jax.grad(loss, argnums=tuple(range(7)))).lower(x, *ps).compile()
text = compiled.as_text()
print("MOSAIC_CALLS", text.count('custom_call_target="tpu_custom_call"'))
print("REDUCE_SCATTERS", text.count("reduce-scatter("))
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
print("COST", cost["flops"], cost["bytes accessed"])
"""


@pytest.mark.slow
def test_compiles_for_a_tpu_target_as_mosaic_kernels_that_declare_their_cost():
  """Deviceless compile for a v5e 2x2 slice: forward and backward are Mosaic kernels, FLOPs counted."""
  stdout = tpu_compile.run(_TPU_COMPILE)
  assert "MOSAIC_CALLS 2" in stdout, stdout
  # The fc1 and fc2 kernels are stored sharded over fsdp: their fp32 gradients are reduce-scattered.
  assert int(stdout.split("REDUCE_SCATTERS")[1].split()[0]) >= 2, stdout
  flops, accessed = map(float, stdout.split("COST")[1].split())
  tokens, d, f = 2 * 512, 256, 1024   # per device
  kernel_flops = (4 + 10) * tokens * d * f  # forward 2 matmuls, backward 5 (one recomputes fc1)
  assert kernel_flops <= flops <= 1.1 * kernel_flops, (flops, kernel_flops)
  declared = sum(fused_mlp.kernel_cost(p, tokens, d, f, 2, 2).bytes_accessed for p in ("fwd", "bwd"))
  assert accessed >= declared, (accessed, declared)
