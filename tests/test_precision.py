"""The mixed-precision policy: dense's custom gradient vs autodiff, and dtypes in the lowered train step."""
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovenc_jax.configs import pretrain
from ovenc_jax.model import precision
from ovenc_jax.train import trainer as train_lib

SPECS = {  # the model's matmul shapes: Linear, q/k/v and output projections (also heads first: splash)
    "ai,io->ao": ((6, 5), (5, 7), (7,)),
    "bnd,dhk->bnhk": ((2, 3, 8), (8, 2, 4), (2, 4)),
    "bnhk,hkd->bnd": ((2, 3, 2, 4), (2, 4, 8), (8,)),
    "bnd,dhk->bhnk": ((2, 3, 8), (8, 2, 4), (2, 4)),
    "bhnk,hkd->bnd": ((2, 2, 3, 4), (2, 4, 8), (8,)),
}
# The bias as the reference adds it: [H, hd] over [B, H, N, hd] skips the N axis.
BIAS_VIEW = {"bnd,dhk->bhnk": lambda b: b[:, None, :]}


@pytest.mark.parametrize("spec", SPECS)
def test_dense_gradient_matches_autodiff(spec):
  rng = np.random.default_rng(0)
  x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in SPECS[spec])
  ct = jnp.asarray(rng.normal(size=jnp.einsum(spec, x, w).shape), jnp.float32)
  view = BIAS_VIEW.get(spec, lambda b: b)
  ref = jax.jit(jax.grad(lambda *a: jnp.sum((jnp.einsum(spec, a[0], a[1]) + view(a[2])) * ct),
                         argnums=(0, 1, 2)))(x, w, b)
  for cdt, rdt, tol in [("float32", "float32", 1e-6), ("bfloat16", "float32", 2e-2), ("bfloat16", "bfloat16", 2e-2)]:
    got = jax.jit(jax.grad(lambda *a: jnp.sum(precision.dense(spec, *a, cdt, rdt).astype(jnp.float32) * ct),
                           argnums=(0, 1, 2)))(x, w, b)
    for name, g, r in zip("xwb", got, ref):
      assert g.dtype == jnp.float32, (name, cdt, rdt)  # cotangents come back in the parameters' dtype
      np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(np.abs(r).max()), err_msg=f"{name} {cdt} {rdt}")
  no_bias = jax.jit(jax.grad(lambda x, w: jnp.sum(precision.dense(spec, x, w, None, "float32") * ct),
                             argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(no_bias[1], ref[1], rtol=1e-6)


def _rand(rng, shape, dtype=jnp.float32, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def test_layer_norm_value_and_gradients_match_autodiff():
  """The hand-written backward (stored row statistics, x recomputed to x-hat) against autodiff of the
  plain formula, in float32 and from a bfloat16 input."""
  rng = np.random.default_rng(1)
  x, ct = _rand(rng, (3, 5, 48), scale=3.0) + 2.0, _rand(rng, (3, 5, 48))
  scale, bias = _rand(rng, (48,)) + 1.0, _rand(rng, (48,))

  def reference(x, scale, bias):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return (xf - mean) / jnp.sqrt(var + 1e-6) * scale + bias

  for dtype, tol in [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-2)]:
    xd = x.astype(dtype)
    loss = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2)))
    (v_got, g_got), (v_ref, g_ref) = (loss(lambda *a: precision.layer_norm(*a, 1e-6))(xd, scale, bias),
                                      loss(reference)(xd, scale, bias))
    np.testing.assert_allclose(v_got, v_ref, rtol=tol)
    for name, g, r in zip(("x", "scale", "bias"), g_got, g_ref):
      assert g.dtype == r.dtype, name
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=tol,
                                 atol=tol * float(np.abs(np.asarray(r, np.float32)).max()), err_msg=f"{name} {dtype}")


def test_bias_gelu_matches_flax_gelu_and_its_autodiff():
  """Exact GELU of y + b: the value equals flax's erf GELU, and the gradients of y and of the fp32 bias
  (summed over every leading axis) equal autodiff of it."""
  import flax.linen as nn
  rng = np.random.default_rng(2)
  y, b, ct = _rand(rng, (2, 7, 40), scale=2.0), _rand(rng, (40,)), _rand(rng, (2, 7, 40))
  ref_fn = lambda y, b: nn.gelu(y + b, approximate=False)
  v_ref, g_ref = jax.value_and_grad(lambda y, b: jnp.sum(ref_fn(y, b) * ct), argnums=(0, 1))(y, b)
  for cdt, tol in [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]:
    v_got, g_got = jax.jit(jax.value_and_grad(
        lambda y, b: jnp.sum(precision.bias_gelu(y.astype(cdt), b).astype(jnp.float32) * ct), argnums=(0, 1)))(y, b)
    np.testing.assert_allclose(v_got, v_ref, rtol=tol)
    assert g_got[1].dtype == jnp.float32  # the bias's gradient comes back in its own dtype
    for name, g, r in zip("yb", g_got, g_ref):
      np.testing.assert_allclose(g, r, rtol=tol, atol=tol * float(np.abs(r).max()), err_msg=f"{name} {cdt}")
  out = precision.bias_gelu(y.astype(jnp.bfloat16), b)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_fn(y.astype(jnp.bfloat16).astype(jnp.float32), b)),
                             rtol=1e-2, atol=1e-2)


def _lowered_train_step(grad_reduce_dtype, fsdp=1):
  cfg = pretrain.get_config("tiny")
  cfg.model.update(dtype="bfloat16", grad_reduce_dtype=grad_reduce_dtype)
  cfg.input.update(global_batch_size=8, tokens_per_row=64)
  cfg.mesh.update(data=8 // fsdp, fsdp=fsdp)
  trainer = train_lib.Trainer(cfg, tempfile.mkdtemp())
  assert trainer.mesh.shape["data"] == 8 // fsdp
  n, s = cfg.input.tokens_per_row, cfg.input.max_segments
  sds = jax.ShapeDtypeStruct
  batch = dict(patches=sds((8, n, 14 * 14 * 3), jnp.uint8), positions=sds((8, n, 3), jnp.int32),
               segment_ids=sds((8, n), jnp.int32), labels=sds((8, s, cfg.input.max_labels), jnp.int32),
               sample_id=sds((8, s), jnp.int32))
  with jax.set_mesh(trainer.mesh):
    text = trainer._step_fn.lower(trainer.abstract_state, batch).as_text()
  kernels = {tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.abstract_state["params"])
             if "kernel" in jax.tree_util.keystr(path)}
  return text, kernels


def _tensor(t):
  *dims, dtype = t.split("x")
  return tuple(int(d) for d in dims), dtype


def _dots(text):
  """(lhs, rhs, result) as ((shape), dtype) for every dot_general in the module."""
  pattern = r"stablehlo\.dot_general .*: \(tensor<([^>]+)>, tensor<([^>]+)>\) -> tensor<([^>]+)>"
  return [tuple(map(_tensor, m)) for m in re.findall(pattern, text)]


@pytest.mark.parametrize("grad_reduce_dtype", ["float32", "bfloat16"])
def test_train_step_dtypes_in_lowered_hlo(grad_reduce_dtype):
  text, kernels = _lowered_train_step(grad_reduce_dtype)
  mlp_dim = pretrain.get_config("tiny").model.mlp_dim
  signature = re.search(r"func\.func public @main\((.*)", text).group(1)
  # Parameters, optimizer state and the metrics (loss included) cross the step boundary in fp32.
  assert "f32>" in signature and "bf16" not in signature
  dots = _dots(text)
  bf16_dots = [d for d in dots if d[0][1] == d[1][1] == "bf16"]
  for k in kernels:
    fwd = [r for l, w, r in bf16_dots if w[0] == k]
    assert fwd and all(r[1] == "bf16" for r in fwd), (k, fwd)  # matmul inputs and outputs in bf16
    # The weight gradient: a bf16 x bf16 matmul contracting the (sharded) batch and token axes whose
    # output dtype is the dtype of the sum XLA finishes with the cross-device reduction.
    grads = [r[1] for l, w, r in bf16_dots if r[0] == k]
    assert grads and set(grads) == {"f32" if grad_reduce_dtype == "float32" else "bf16"}, (k, grads)
  # Softmax statistics (attention scores [.., heads, q, k] and the loss), norms and logs are fp32; the
  # only bf16 exponential is exact GELU's derivative on the [.., mlp_dim] activations.
  types = {op: [_tensor(t) for t in re.findall(rf"stablehlo\.{op} %\S+ : tensor<([^>]+)>", text)]
           for op in ("exponential", "rsqrt", "log")}
  for op, found in types.items():
    assert {d for shape, d in found if shape[-1] != mlp_dim} == {"f32"}, (op, found)
  heads, tokens = 4, 64
  # The self-attention softmax over [B, H, Nq, Nk] (ovenc_jax/model/attention/xla.py).
  assert ((8, heads, tokens, tokens), "f32") in types["exponential"]


@pytest.mark.parametrize("grad_reduce_dtype", ["float32", "bfloat16"])
def test_fsdp_gathers_in_compute_dtype_and_reduce_scatters_in_grad_reduce_dtype(grad_reduce_dtype):
  """mesh.fsdp=4: every FSDP-sharded kernel's gradient leaves its shard_map through a reduce-scatter in
  `grad_reduce_dtype`, and the weights are gathered (sharding constraint) after the cast to bf16."""
  text, kernels = _lowered_train_step(grad_reduce_dtype, fsdp=4)
  scatters = re.findall(r'"stablehlo\.reduce_scatter".*?\}\) : \(tensor<([^>]+)>\)', text, re.S)
  rdt = "f32" if grad_reduce_dtype == "float32" else "bf16"
  # A kernel's gradient is scattered from its full shape (the loss's own reductions stay fp32).
  weight_scatters = [_tensor(t) for t in scatters if _tensor(t)[0] in kernels]
  assert {shape for shape, _ in weight_scatters} == kernels  # every kernel has an embed (fsdp) axis
  assert {dtype for _, dtype in weight_scatters} == {rdt}
  gathered = re.findall(r"sdy\.sharding_constraint .*?: tensor<([^>]+)>", text)
  assert any(_tensor(t)[1] == "bf16" and _tensor(t)[0] in kernels for t in gathered)


@pytest.mark.parametrize("rows", [8, 3])
def test_fsdp_weight_gradient_with_and_without_a_dividing_batch(rows):
  """An FSDP weight's gradient (reduce-scattered when the batch divides over the batch axes, XLA's
  own reduction when it does not, e.g. the batch-1 example at init) equals one device's."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  stored = jax.sharding.PartitionSpec("fsdp", None)
  fsdp = precision.fsdp_specs(stored, ("data", "fsdp"))
  assert fsdp is not None and fsdp.gathered == jax.sharding.PartitionSpec(None, None)
  rng = np.random.default_rng(rows)
  x = jnp.asarray(rng.normal(size=(rows, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(8,)), jnp.float32)

  def loss(x, w, b, fsdp):
    return jnp.sum(jnp.sin(precision.dense("ai,io->ao", x, w, b, jnp.float32, jnp.float32, fsdp)))

  want = jax.grad(loss, argnums=(0, 1, 2))(x, w, b, None)
  with jax.set_mesh(mesh):
    ws = jax.device_put(w, jax.sharding.NamedSharding(mesh, stored))
    step = jax.jit(jax.grad(lambda x, w, b: loss(x, w, b, fsdp), argnums=(0, 1, 2)))
    text = step.lower(x, ws, b).as_text()
    got = step(x, ws, b)
  assert ("reduce_scatter" in text) == (rows % 8 == 0)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
  if rows % 8 == 0:
    # The shard_map hands back the stored shards.
    assert got[1].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, stored), 2)
