"""The mixed-precision policy, in one place.

- Parameters and optimizer state: float32 (created fp32 by the model, Adam moments follow them).
- Matmuls and activations: `model.dtype` (bfloat16 on accelerators); inputs are cast just before use.
- Softmax statistics, LayerNorm/RMSNorm, RoPE rotation and the loss: float32 (upcast inside the op).
- Gradient reduction: `model.grad_reduce_dtype` (float32 by default). A weight's gradient is a sum over
  every token of the global batch, and that sum is what the data/fsdp all-reduce (or reduce-scatter)
  finishes; under plain autodiff of a bf16 matmul it runs in bf16 (the cotangent's dtype), which is a
  numerics choice nobody made. `dense` below makes the weight-gradient matmul emit `grad_reduce_dtype`,
  so the partial sums, their cross-device reduction and the bias sums all run in that dtype.
- FSDP: a weight sharded over an axis that also shards the batch is all-gathered in the compute dtype
  just before its matmul (forward, and again for the input gradient), and its gradient is
  reduce-scattered into the stored shards in `grad_reduce_dtype` (`psum_scatter` in a `shard_map`),
  where the partitioner left to itself all-reduces small weights' full gradients and slices them.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

PARAM_DTYPE = jnp.float32
COMPUTE_DTYPES = ("float32", "bfloat16")
REDUCE_DTYPES = ("float32", "bfloat16")


def dense(spec: str, x, w, b, compute_dtype, grad_reduce_dtype=jnp.float32, fsdp=None):
  """einsum(spec, x, w) + b in `compute_dtype`; dW and db come out of matmul/sum in `grad_reduce_dtype`.

  spec is a two-operand einsum ("bnd,dhk->bnhk") where every index is in exactly two of x, w, out, and
  x's first index is the batch; b (or None) is indexed by the output's last b.ndim indices that come
  from w, in output order ("hk" for "bnd,dhk->bnhk" and for "bnd,dhk->bhnk").
  fsdp: None, or the weight's `Fsdp` specs under the current mesh (`fsdp_specs`).
  """
  cdt, rdt = jnp.dtype(compute_dtype), jnp.dtype(grad_reduce_dtype)
  return _dense(spec, cdt, rdt, fsdp, x.astype(cdt), w, b)


class Fsdp(NamedTuple):
  """A weight stored sharded over mesh axes that also shard the batch."""
  stored: jax.sharding.PartitionSpec    # the parameter's sharding
  gathered: jax.sharding.PartitionSpec  # the same without the batch axes (tensor-parallel axes stay)
  batch_axes: tuple[str, ...]           # the mesh axes of the batch dimension


def _names(entry) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _entry(names):
  return None if not names else names[0] if len(names) == 1 else tuple(names)


def fsdp_specs(stored: jax.sharding.PartitionSpec, batch_axes) -> Fsdp | None:
  """`Fsdp` for a weight whose spec names a mesh axis of the batch, else None. batch_axes: the batch
  dimension's spec entry (a mesh axis name, a tuple of them, or None)."""
  batch_axes = _names(batch_axes)
  gathered = jax.sharding.PartitionSpec(*(_entry(tuple(a for a in _names(e) if a not in batch_axes))
                                          for e in stored))
  return None if gathered == stored else Fsdp(stored, gathered, batch_axes)


def _fsdp_shards(fsdp, mesh) -> int:
  """How many ways the weight is split over batch axes under `mesh` (1: not at all, or no mesh)."""
  if fsdp is None or mesh.empty:
    return 1
  return math.prod(mesh.shape[a] for e in fsdp.stored for a in _names(e) if a in fsdp.batch_axes)


def _use(w, cdt, fsdp):
  w = w.astype(cdt)
  if _fsdp_shards(fsdp, jax.sharding.get_abstract_mesh()) == 1:
    return w
  # The barrier pins the cast before the gather: XLA (GPU) would otherwise gather fp32 and cast after.
  return jax.lax.with_sharding_constraint(jax.lax.optimization_barrier(w), fsdp.gathered)


def _weight_grad(spec, rdt, fsdp, x, dy):
  """dW = x^T dy in `rdt`. Under FSDP each device contracts its own batch rows, then the partial sums
  are reduce-scattered over the weight's batch axes (psum over any batch axis it is not stored on):
  written out, because left to itself the partitioner all-reduces small weights' gradients in full."""
  xs, ws, out = _specs(spec)
  local = lambda x, dy: jnp.einsum(f"{xs},{out}->{ws}", x, dy, preferred_element_type=rdt)
  mesh = jax.sharding.get_abstract_mesh()
  # Unsharded weights (a data-parallel mesh) keep XLA's own all-reduce; a batch that does not divide
  # (the batch-1 example of init) has nothing to scatter.
  if _fsdp_shards(fsdp, mesh) == 1 or x.shape[0] % math.prod(mesh.shape[a] for a in fsdp.batch_axes):
    return local(x, dy)
  # Operand layouts: the batch index on the batch axes, an index shared with the weight on the
  # weight's gathered (tensor-parallel) axes, anything else whole.
  w_axes = dict(zip(ws, list(fsdp.gathered) + [None] * len(ws)))

  def operand_spec(indices):
    return jax.sharding.PartitionSpec(*(_entry(fsdp.batch_axes) if i == xs[0] else w_axes.get(i)
                                        for i in indices))

  reduce = lambda x, dy: reduce_over_batch(local(x, dy), fsdp.stored, fsdp.batch_axes)
  return jax.shard_map(reduce, mesh=mesh, in_specs=(operand_spec(xs), operand_spec(out)),
                       out_specs=fsdp.stored, check_vma=False)(x, dy)


def reduce_over_batch(dw, stored: jax.sharding.PartitionSpec, batch_axes):
  """Inside shard_map: one device's partial sum of a weight's gradient -> its stored shard, summed over
  every device of the batch axes (reduce-scattered over the batch axes the weight is stored on,
  all-reduced over the others)."""
  batch_axes = _names(batch_axes)
  done = set()
  for dim, entry in enumerate(tuple(stored)[:dw.ndim]):
    scatter = tuple(a for a in _names(entry) if a in batch_axes)
    if scatter:
      dw = jax.lax.psum_scatter(dw, scatter, scatter_dimension=dim, tiled=True)
      done.update(scatter)
  rest = tuple(a for a in batch_axes if a not in done)
  return jax.lax.psum(dw, rest) if rest else dw


def _groups(spec):
  """Runs of indices that are adjacent, in the same order, in every term of `spec` that has them
  (except the first operand's first index: the batch)."""
  terms = spec.replace("->", ",").split(",")
  nxt = {}
  for t in terms:
    for i, j in zip(t, t[1:]):
      nxt.setdefault(i, set()).add(j)
  holders = {i: {n for n, t in enumerate(terms) if i in t} for i in "".join(terms)}
  joins = {i: next(iter(js)) for i, js in nxt.items()
           if len(js) == 1 and holders[next(iter(js))] == holders[i]
           and all(t.index(i) + 1 == t.index(next(iter(js))) for t in terms if i in t)}
  joins.pop(terms[0][0], None)  # the batch index stays a dimension of its own (its sharding)
  groups, seen = [], set()
  for t in terms:
    for i in t:
      if i in seen or i in joins.values():
        continue
      run = [i]
      while run[-1] in joins:
        run.append(joins[run[-1]])
      seen.update(run)
      groups.append("".join(run))
  return groups


def matmul(spec: str, a, b, preferred_element_type=None):
  """jnp.einsum(spec, a, b) with each run of indices adjacent in all terms merged into one dimension.

  The reshapes are free, and XLA:CPU then passes the weight to its matmul as stored. `dense` uses it
  for the input gradient: written with the weight's [H, hd] axes apart (a head projection's input
  gradient contracts both, the output projection's produces both), XLA:CPU copies each attention
  weight into a transposed layout on every step.
  """
  groups = _groups(spec)
  if all(len(g) == 1 for g in groups):
    return jnp.einsum(spec, a, b, preferred_element_type=preferred_element_type)
  ins, out = spec.split("->")
  sa, sb = ins.split(",")
  sizes = dict(zip(sa, a.shape)) | dict(zip(sb, b.shape))
  letter = {g: chr(ord("A") + n) for n, g in enumerate(groups)}

  def merge(term):
    gs = [g for g in groups if g[0] in term]
    gs.sort(key=lambda g: term.index(g[0]))
    return "".join(letter[g] for g in gs), tuple(math.prod(sizes[i] for i in g) for g in gs)

  (ma, shape_a), (mb, shape_b), (mo, _) = merge(sa), merge(sb), merge(out)
  y = jnp.einsum(f"{ma},{mb}->{mo}", a.reshape(shape_a), b.reshape(shape_b),
                 preferred_element_type=preferred_element_type)
  return y.reshape(tuple(sizes[i] for i in out))


def _specs(spec):
  ins, out = spec.split("->")
  xs, ws = ins.split(",")
  return xs, ws, out


def _bias_indices(spec, b_ndim: int) -> str:
  _, ws, out = _specs(spec)
  from_w = "".join(i for i in out if i in ws)
  return from_w[len(from_w) - b_ndim:]


def _add_bias(spec, y, b):
  """y + b, b broadcast over the output indices it lacks (those between its own, too)."""
  idx, out = _bias_indices(spec, b.ndim), _specs(spec)[2]
  tail = out[out.index(idx[0]):]
  return y + b.reshape(tuple(b.shape[idx.index(i)] if i in idx else 1 for i in tail))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _dense(spec, cdt, rdt, fsdp, x, w, b):
  y = jnp.einsum(spec, x, _use(w, cdt, fsdp))
  return y if b is None else _add_bias(spec, y, b.astype(cdt))


def _dense_fwd(spec, cdt, rdt, fsdp, x, w, b):
  # Residuals are x (already in compute dtype) and the fp32 parameters themselves (their shards, under
  # FSDP), which are alive anyway: the backward recasts (and re-gathers) w instead of keeping a
  # second, compute-dtype copy per layer.
  return _dense(spec, cdt, rdt, fsdp, x, w, b), (x, w, b)


def _dense_bwd(spec, cdt, rdt, fsdp, res, dy):
  x, w, b = res
  xs, ws, out = _specs(spec)
  dx = matmul(f"{out},{ws}->{xs}", dy, _use(w, cdt, fsdp), preferred_element_type=cdt)
  dw = _weight_grad(spec, rdt, fsdp, x, dy).astype(w.dtype)
  db = None if b is None else jnp.einsum(f"{out}->{_bias_indices(spec, b.ndim)}", dy.astype(rdt)).astype(b.dtype)
  return dx, dw, db


_dense.defvjp(_dense_fwd, _dense_bwd)


def bias_gelu(y, b, grad_reduce_dtype=jnp.float32):
  """Exact (erf) GELU of y + b in y's dtype, y a matmul's output in the compute dtype and b its
  (float32) bias. The bias is added in the compute dtype and the activation evaluated in float32, as
  PyTorch's bf16 nn.GELU does. Its backward keeps only y: under autodiff the biased input and the
  erf terms are saved too, activation-sized tensors written in the forward pass and read back in the
  backward; here the derivative is recomputed from y and b inside the backward's fusion, and b's
  gradient is summed in `grad_reduce_dtype` as `dense` sums a bias's."""
  return _bias_gelu(jnp.dtype(grad_reduce_dtype), y, b)


def _gelu_terms(y, b):
  x = (y + b.astype(y.dtype)).astype(jnp.float32)
  return x, 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bias_gelu(rdt, y, b):
  x, cdf = _gelu_terms(y, b)
  return (x * cdf).astype(y.dtype)


def _bias_gelu_fwd(rdt, y, b):
  return _bias_gelu(rdt, y, b), (y, b)


def _bias_gelu_bwd(rdt, res, dh):
  y, b = res
  x, cdf = _gelu_terms(y, b)
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  dx = (dh.astype(jnp.float32) * (cdf + x * pdf)).astype(y.dtype)
  db = jnp.sum(dx.astype(rdt), tuple(range(dx.ndim - 1)))
  return dx, db.astype(b.dtype)


_bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def layer_norm(x, scale, bias, eps: float):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32, with a hand-written
  backward pass.

  Under autodiff XLA:CPU fuses the residual stream's gradient, an elementwise chain through every
  block's LayerNorm backward, into each of its consumers, so every block recomputes the terms of all
  the blocks above it (fusions with 200 operands; a third of a 12-block backward pass's non-matmul
  time). This backward's input gradient is materialised once per LayerNorm.
  """
  return _layer_norm(eps, x, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _layer_norm(eps, x, scale, bias):
  return _layer_norm_fwd(eps, x, scale, bias)[0]


def _welford(a, b):
  """Chan et al.'s pairwise merge of two (count, mean, sum of squared deviations) partials."""
  (n_a, m_a, s_a), (n_b, m_b, s_b) = a, b
  n = n_a + n_b
  delta = m_b - m_a
  w = jnp.where(n > 0, n_b / jnp.where(n > 0, n, 1.0), 0.0)
  return n, m_a + delta * w, s_a + s_b + delta * delta * n_a * w


def _mean_var(xf):
  """Mean and variance over the last axis in one pass over x, numerically as stable as two passes:
  a Welford reduction. Two passes (the mean, then the squared deviations) read x from memory twice;
  the one-pass E[x^2] - E[x]^2 cancels catastrophically for rows whose mean is far from zero."""
  zeros = jnp.zeros((), xf.dtype)
  n, mean, m2 = jax.lax.reduce((jnp.ones_like(xf), xf, jnp.zeros_like(xf)), (zeros, zeros, zeros),
                               _welford, (xf.ndim - 1,))
  return mean[..., None], (m2 / n)[..., None]


def _layer_norm_fwd(eps, x, scale, bias):
  xf = x.astype(jnp.float32)
  mean, var = _mean_var(xf)
  rstd = jax.lax.rsqrt(var + eps)
  # The residuals are x itself (in its own, compute dtype: alive anyway as the block's input) and
  # two floats a row; the normalised x is recomputed in each fusion of the backward that needs it.
  # The barrier keeps the row statistics stored: left to itself XLA recomputes them inside every
  # backward fusion, and a fusion that needs a row reduction cannot also sum over the rows, so the
  # scale's gradient would go through an fp32 activation-sized temporary.
  stats = jax.lax.optimization_barrier((mean, rstd))
  return (xf - mean) * rstd * scale + bias, (x, *stats, scale)


def _layer_norm_bwd(eps, res, dy):
  x, mean, rstd, scale = res
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dy = dy.astype(jnp.float32)
  g = dy * scale
  # Row statistics first (one reduction over the features), then the input gradient elementwise,
  # and the parameter gradients as column sums of dy and dy * xhat straight from dy and x.
  g_mean = g.mean(-1, keepdims=True)
  gx_mean = (g * xhat).mean(-1, keepdims=True)
  dx = rstd * (g - g_mean - xhat * gx_mean)
  lead = tuple(range(dy.ndim - 1))
  return dx.astype(x.dtype), jnp.sum(dy * xhat, lead), jnp.sum(dy, lead)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
