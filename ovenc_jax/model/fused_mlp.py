"""The pre-LN MLP block, x + fc2(gelu(fc1(ln(x)))), as one Pallas kernel per pass (TPU; interpret mode elsewhere).

Why: compiled for v5e, XLA writes the block's [tokens, mlp_dim] hidden activations to HBM and reads
them back several times per pass (bias, exact GELU, the weight gradients), and its LayerNorm and
residual add are passes of their own. This kernel keeps a tile of tokens in VMEM from the LayerNorm
to the residual add: HBM sees x and y (forward), x, dy and dx (backward), the weights once per pass
and the fp32 weight gradients once; the backward recomputes the hidden activations instead of
storing them. Each pallas_call declares those FLOPs and bytes to XLA (`pl.CostEstimate`).

Numerics follow precision.py: matmul operands in the compute dtype, fp32 accumulation, LayerNorm,
GELU and the residual add in fp32, weight and bias gradients summed in fp32 and reduced across
devices in `grad_reduce_dtype`. Under a mesh the kernel runs per device in `shard_map` (Mosaic
kernels are not partitioned automatically): weights gathered in the compute dtype before it,
gradients reduce-scattered into their stored shards after it (precision.reduce_over_batch).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ovenc_jax.model import precision
from ovenc_jax import sharding

TOKEN_BLOCKS = (512, 256, 128)  # tokens a grid step, largest first: the largest whose VMEM fits
SUBLANES = 8
# The limit is v5p's VMEM a core, the smallest of the TPUs targeted: one limit for all, and a budget
# below it for the kernel's own estimate (Mosaic adds spill slots and pipeline buffers of its own).
VMEM_LIMIT_BYTES = 64 * 2**20
VMEM_BUDGET_BYTES = 56 * 2**20
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
NT = (((1,), (1,)), ((), ()))   # a @ b.T
TN = (((0,), (0,)), ((), ()))   # a.T @ b


def _gelu(h):
  return 0.5 * h * (1.0 + jax.lax.erf(h * _SQRT_HALF))


def _gelu_grad(h):
  return 0.5 * (1.0 + jax.lax.erf(h * _SQRT_HALF)) + h * _INV_SQRT_2PI * jnp.exp(-0.5 * h * h)


def _normalize(x, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
  return xc * rstd, rstd


def _fwd_kernel(x_ref, s_ref, c_ref, w1_ref, b1_ref, w2_ref, b2_ref, y_ref, *, eps):
  cdt = w1_ref.dtype
  x = x_ref[...].astype(jnp.float32)
  xhat, _ = _normalize(x, eps)
  ln = (xhat * s_ref[...] + c_ref[...]).astype(cdt)
  h = jnp.dot(ln, w1_ref[...], preferred_element_type=jnp.float32) + b1_ref[...]
  o = jnp.dot(_gelu(h).astype(cdt), w2_ref[...], preferred_element_type=jnp.float32) + b2_ref[...]
  y_ref[...] = (x + o).astype(y_ref.dtype)


def _bwd_kernel(x_ref, dy_ref, s_ref, c_ref, w1_ref, b1_ref, w2_ref,
                dx_ref, dw1_ref, db1_ref, dw2t_ref, db2_ref, ds_ref, dc_ref, *, eps):
  cdt = w1_ref.dtype

  @pl.when(pl.program_id(0) == 0)
  def _():
    for ref in (dw1_ref, db1_ref, dw2t_ref, db2_ref, ds_ref, dc_ref):
      ref[...] = jnp.zeros_like(ref)

  x = x_ref[...].astype(jnp.float32)
  xhat, rstd = _normalize(x, eps)
  scale = s_ref[...]
  ln = (xhat * scale + c_ref[...]).astype(cdt)
  h = jnp.dot(ln, w1_ref[...], preferred_element_type=jnp.float32) + b1_ref[...]
  dy = dy_ref[...]
  dyf = dy.astype(jnp.float32)
  # fc2's gradient comes out transposed, [D, F]: its FSDP shards split D, and a reduce-scatter over
  # the leading dimension stays one (XLA turned one over the minor dimension into a full all-reduce).
  dw2t_ref[...] += jax.lax.dot_general(dy.astype(cdt), _gelu(h).astype(cdt), TN,
                                       preferred_element_type=jnp.float32)
  db2_ref[...] += jnp.sum(dyf, axis=0, keepdims=True)
  dg = jax.lax.dot_general(dy.astype(cdt), w2_ref[...], NT, preferred_element_type=jnp.float32)
  dh = dg * _gelu_grad(h)
  dhc = dh.astype(cdt)
  dw1_ref[...] += jax.lax.dot_general(ln, dhc, TN, preferred_element_type=jnp.float32)
  db1_ref[...] += jnp.sum(dh, axis=0, keepdims=True)
  dln = jax.lax.dot_general(dhc, w1_ref[...], NT, preferred_element_type=jnp.float32)
  ds_ref[...] += jnp.sum(dln * xhat, axis=0, keepdims=True)
  dc_ref[...] += jnp.sum(dln, axis=0, keepdims=True)
  g = dln * scale
  dxhat = g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
  dx_ref[...] = (dyf + rstd * dxhat).astype(dx_ref.dtype)


def kernel_cost(phase: str, tokens: int, d: int, f: int, act_bytes: int, w_bytes: int) -> pl.CostEstimate:
  """FLOPs, erf/exp count and HBM bytes of one call over `tokens` rows of width d (hidden f).

  Forward: two matmuls; x read, y written, both weights read once. Backward: the hidden activations
  recomputed (one matmul) and four gradient matmuls; x and dy read, dx written, weights read once,
  the fp32 weight gradients written once.
  """
  small = 4 * (3 * d + f)  # LayerNorm scale and bias, both biases (fp32)
  if phase == "fwd":
    return pl.CostEstimate(flops=4 * tokens * d * f, transcendentals=tokens * f,
                           bytes_accessed=2 * tokens * d * act_bytes + 2 * d * f * w_bytes + small)
  return pl.CostEstimate(flops=10 * tokens * d * f, transcendentals=3 * tokens * f,
                         bytes_accessed=3 * tokens * d * act_bytes + 2 * d * f * (w_bytes + 4) + 2 * small)


def vmem_bytes(block: int, d: int, f: int, w_bytes: int) -> int:
  """VMEM the backward kernel (the larger pass) needs: whole weights and fp32 weight gradients held
  for the whole grid, plus a token block's fp32 temporaries ([block, f]: hidden, its GELU and
  gradients; [block, d]: x, its normalised form and gradients). Measured by Mosaic for large (1024,
  4096) at 512 tokens: 74.9 MB, this estimate 83.9 MB."""
  return 2 * d * f * (w_bytes + 4) + block * (3 * f + 4 * d) * 4


def token_block(tokens: int, d: int, f: int, w_bytes: int) -> int | None:
  """The grid's token block: the largest of TOKEN_BLOCKS within the VMEM budget (no more than the
  tokens there are, rounded up to a sublane multiple); None when even the smallest does not fit."""
  for block in TOKEN_BLOCKS:
    if vmem_bytes(block, d, f, w_bytes) <= VMEM_BUDGET_BYTES:
      return min(block, -(-tokens // SUBLANES) * SUBLANES)
  return None


def _block(tokens, d, f, w_bytes):
  block = token_block(tokens, d, f, w_bytes)
  if block is None:
    raise ValueError(f"model.mlp_kernel='pallas': width {d} x mlp_dim {f} weights and their fp32 "
                     f"gradients need {vmem_bytes(TOKEN_BLOCKS[-1], d, f, w_bytes) / 2**20:.0f} MiB of VMEM, "
                     f"over the {VMEM_BUDGET_BYTES / 2**20:.0f} MiB budget: use model.mlp_kernel='xla' or 'auto'")
  return block


def _specs(block, d, f, resident):
  row = lambda n: pl.BlockSpec((block, n), lambda i: (i, 0))
  # Weights and gradient sums are the same block at every step: one VMEM buffer, not two.
  whole = lambda *shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape), **resident)
  return row, whole


def _compiler_params(interpret):
  if interpret:
    return {}
  # The token axis carries the weight-gradient sums from step to step: sequential.
  return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",),
                                                   vmem_limit_bytes=VMEM_LIMIT_BYTES))


def _pad_rows(x, block):
  pad = -x.shape[0] % block
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def local_forward(x, ln_scale, ln_bias, w1, b1, w2, b2, *, eps, interpret):
  """x [T, D] -> x + mlp(ln(x)) [T, D] on one device; w1/w2 in the compute dtype, the rest fp32."""
  t, d = x.shape
  f = w1.shape[1]
  block = _block(t, d, f, w1.dtype.itemsize)
  xp = _pad_rows(x, block)
  resident = {} if interpret else dict(pipeline_mode=pl.Buffered(1))
  row, whole = _specs(block, d, f, resident)
  y = pl.pallas_call(
      functools.partial(_fwd_kernel, eps=eps),
      grid=(xp.shape[0] // block,),
      in_specs=[row(d), whole(1, d), whole(1, d), whole(d, f), whole(1, f), whole(f, d), whole(1, d)],
      out_specs=row(d),
      out_shape=jax.ShapeDtypeStruct(xp.shape, x.dtype),
      cost_estimate=kernel_cost("fwd", xp.shape[0], d, f, x.dtype.itemsize, w1.dtype.itemsize),
      interpret=interpret, name="fused_mlp_fwd", **_compiler_params(interpret),
  )(xp, ln_scale.reshape(1, d), ln_bias.reshape(1, d), w1, b1.reshape(1, f), w2, b2.reshape(1, d))
  return y[:t]


def local_backward(x, dy, ln_scale, ln_bias, w1, b1, w2, *, eps, interpret):
  """Per-device gradients: dx [T, D] and fp32 sums over this device's tokens for
  (ln_scale, ln_bias, w1, b1, w2 transposed ([D, F]), b2)."""
  t, d = x.shape
  f = w1.shape[1]
  block = _block(t, d, f, w1.dtype.itemsize)
  xp, dyp = _pad_rows(x, block), _pad_rows(dy, block)  # padded rows have dy = 0: no gradient
  resident = {} if interpret else dict(pipeline_mode=pl.Buffered(1))
  row, whole = _specs(block, d, f, resident)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  dx, dw1, db1, dw2t, db2, ds, dc = pl.pallas_call(
      functools.partial(_bwd_kernel, eps=eps),
      grid=(xp.shape[0] // block,),
      in_specs=[row(d), row(d), whole(1, d), whole(1, d), whole(d, f), whole(1, f), whole(f, d)],
      out_specs=[row(d), whole(d, f), whole(1, f), whole(d, f), whole(1, d), whole(1, d), whole(1, d)],
      out_shape=[jax.ShapeDtypeStruct(xp.shape, x.dtype), f32(d, f), f32(1, f), f32(d, f), f32(1, d),
                 f32(1, d), f32(1, d)],
      cost_estimate=kernel_cost("bwd", xp.shape[0], d, f, x.dtype.itemsize, w1.dtype.itemsize),
      interpret=interpret, name="fused_mlp_bwd", **_compiler_params(interpret),
  )(xp, dyp, ln_scale.reshape(1, d), ln_bias.reshape(1, d), w1, b1.reshape(1, f), w2)
  return dx[:t], (ds[0], dc[0], dw1, db1[0], dw2t, db2[0])


def split_axes(stored_specs, batch_axes, mesh=None) -> list[str]:
  """Mesh axes of size > 1, other than the batch's, that split one of the block's weights (tensor
  parallelism): the kernel keeps whole weights on a device, so it cannot run under them."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or not stored_specs:
    return []
  batch_axes = precision._names(batch_axes)
  return sorted({a for spec in stored_specs for e in spec for a in precision._names(e)
                 if a not in batch_axes and mesh.shape[a] > 1})


def auto_picks_kernel(platform: str, stored_specs, batch_axes, d: int, f: int, compute_dtype) -> bool:
  """`model.mlp_kernel=auto`: the kernel where Mosaic compiles it (TPU), no tensor axis splits the
  weights and they fit VMEM whole (base and large do; huge does not); XLA's fusions elsewhere."""
  fits = token_block(TOKEN_BLOCKS[0], d, f, jnp.dtype(compute_dtype).itemsize) is not None
  return platform == "tpu" and fits and not split_axes(stored_specs, batch_axes)


class Layout:
  """Where the block's operands live under the current mesh (empty mesh: nothing to do)."""

  def __init__(self, x_shape, stored_specs, batch_axes):
    self.mesh = jax.sharding.get_abstract_mesh()
    self.stored = stored_specs
    axes = precision._names(batch_axes)
    shards = 1 if self.mesh.empty else math.prod(self.mesh.shape[a] for a in axes)
    # A batch the batch axes do not divide (the batch-1 example at init) runs replicated.
    self.batch_axes = axes if shards > 1 and x_shape[0] % shards == 0 else ()
    held = split_axes(stored_specs, axes, self.mesh)
    if held:
      raise ValueError(f"model.mlp_kernel='pallas' keeps whole weights on each device; mesh axes "
                       f"{held} split them (tensor parallelism): use model.mlp_kernel='xla' or 'auto'")

  @property
  def x_spec(self):
    return jax.P(precision._entry(self.batch_axes), None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _block_call(eps, cdt, rdt, layout, x, ln_scale, ln_bias, w1, b1, w2, b2):
  return _forward(eps, cdt, layout, x, ln_scale, ln_bias, w1, b1, w2, b2)


def _interpret():
  return sharding.mesh_platform() != "tpu"


def _gathered(w, cdt, layout):
  w = w.astype(cdt)
  if layout.mesh.empty:
    return w
  # As precision._use: cast, then gather the compute-dtype copy (the barrier keeps that order).
  return jax.lax.with_sharding_constraint(jax.lax.optimization_barrier(w), jax.P())


def _per_device(fn, layout, in_specs, out_specs):
  if layout.mesh.empty:
    return fn
  return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _forward(eps, cdt, layout, x, ln_scale, ln_bias, w1, b1, w2, b2):
  interpret = _interpret()

  def local(x, s, c, w1, b1, w2, b2):
    b, n, d = x.shape
    y = local_forward(x.reshape(b * n, d), s, c, w1, b1, w2, b2, eps=eps, interpret=interpret)
    return y.reshape(b, n, d)

  fn = _per_device(local, layout, (layout.x_spec,) + (jax.P(),) * 6, layout.x_spec)
  return fn(x, ln_scale, ln_bias, _gathered(w1, cdt, layout), b1, _gathered(w2, cdt, layout), b2)


def _block_fwd(eps, cdt, rdt, layout, x, ln_scale, ln_bias, w1, b1, w2, b2):
  y = _forward(eps, cdt, layout, x, ln_scale, ln_bias, w1, b1, w2, b2)
  return y, (x, ln_scale, ln_bias, w1, b1, w2, b2)


def _block_bwd(eps, cdt, rdt, layout, res, dy):
  x, ln_scale, ln_bias, w1, b1, w2, b2 = res
  interpret = _interpret()
  params = (ln_scale, ln_bias, w1, b1, w2, b2)

  def local(x, dy, s, c, w1, b1, w2):
    b, n, d = x.shape
    dx, grads = local_backward(x.reshape(b * n, d), dy.reshape(b * n, d), s, c, w1, b1, w2,
                               eps=eps, interpret=interpret)
    specs = list(layout.stored)
    specs[4] = jax.P(*reversed(tuple(specs[4]) + (None,) * (2 - len(specs[4]))))  # fc2's, transposed
    grads = [precision.reduce_over_batch(g.astype(rdt), spec, layout.batch_axes)
             for g, spec in zip(grads, specs)]
    grads[4] = grads[4].T
    return dx.reshape(b, n, d), tuple(grads)

  # Reduced gradients come out in their stored shards; unreduced (replicated batch) ones whole.
  grad_specs = tuple(layout.stored) if layout.batch_axes else (jax.P(),) * len(params)
  fn = _per_device(local, layout, (layout.x_spec,) * 2 + (jax.P(),) * 5, (layout.x_spec, grad_specs))
  dx, grads = fn(x, dy.astype(x.dtype), ln_scale, ln_bias, _gathered(w1, cdt, layout), b1,
                 _gathered(w2, cdt, layout))
  return (dx,) + tuple(g.astype(p.dtype) for g, p in zip(grads, params))


_block_call.defvjp(_block_fwd, _block_bwd)


def mlp_block(x, ln_scale, ln_bias, w1, b1, w2, b2, *, eps, compute_dtype, grad_reduce_dtype=jnp.float32,
              stored_specs=None, batch_axes=None):
  """x [B, N, D] -> x + fc2(gelu(fc1(layer_norm(x)))) in the compute dtype.

  stored_specs: the six parameters' PartitionSpecs under the mesh (ln scale, ln bias, fc1 kernel,
  fc1 bias, fc2 kernel, fc2 bias); batch_axes: the batch dimension's mesh axes. Both ignored without
  a mesh.
  """
  cdt, rdt = jnp.dtype(compute_dtype), jnp.dtype(grad_reduce_dtype)
  stored = tuple(stored_specs or (jax.P(),) * 6)
  layout = Layout(x.shape, stored, batch_axes)
  return _block_call(float(eps), cdt, rdt, layout, x.astype(cdt), ln_scale, ln_bias, w1, b1, w2, b2)

