"""The mixed-precision policy, in one place.

- Parameters and optimizer state: float32 (created fp32 by the model, Adam moments follow them).
- Matmuls and activations: `model.dtype` (bfloat16 on accelerators); inputs are cast just before use.
- Softmax statistics, LayerNorm/RMSNorm, RoPE rotation and the loss: float32 (upcast inside the op).
- Gradient reduction: `model.grad_reduce_dtype` (float32 by default). A weight's gradient is a sum over
  every token of the global batch, and that sum is what the data/fsdp all-reduce (or reduce-scatter)
  finishes; under plain autodiff of a bf16 matmul it runs in bf16 (the cotangent's dtype), which is a
  numerics choice nobody made. `dense` below makes the weight-gradient matmul emit `grad_reduce_dtype`,
  so the partial sums, their cross-device reduction and the bias sums all run in that dtype.
"""
import functools

import jax
import jax.numpy as jnp

PARAM_DTYPE = jnp.float32
COMPUTE_DTYPES = ("float32", "bfloat16")
REDUCE_DTYPES = ("float32", "bfloat16")


def dense(spec: str, x, w, b, compute_dtype, grad_reduce_dtype=jnp.float32):
  """einsum(spec, x, w) + b in `compute_dtype`; dW and db come out of matmul/sum in `grad_reduce_dtype`.

  spec is a two-operand einsum ("bnd,dhk->bnhk") where every index is in exactly two of x, w, out; b
  (or None) is indexed by the trailing indices of the output.
  """
  cdt, rdt = jnp.dtype(compute_dtype), jnp.dtype(grad_reduce_dtype)
  return _dense(spec, cdt, rdt, x.astype(cdt), w, b)


def _specs(spec):
  ins, out = spec.split("->")
  xs, ws = ins.split(",")
  return xs, ws, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _dense(spec, cdt, rdt, x, w, b):
  y = jnp.einsum(spec, x, w.astype(cdt))
  return y if b is None else y + b.astype(cdt)


def _dense_fwd(spec, cdt, rdt, x, w, b):
  # Residuals are x (already in compute dtype) and the fp32 parameters themselves, which are alive
  # anyway: the backward recasts w instead of keeping a second, compute-dtype copy per layer.
  return _dense(spec, cdt, rdt, x, w, b), (x, w, b)


def _dense_bwd(spec, cdt, rdt, res, dy):
  x, w, b = res
  xs, ws, out = _specs(spec)
  dx = jnp.einsum(f"{out},{ws}->{xs}", dy, w.astype(cdt), preferred_element_type=cdt)
  dw = jnp.einsum(f"{xs},{out}->{ws}", x, dy, preferred_element_type=rdt).astype(w.dtype)
  db = None if b is None else jnp.einsum(f"{out}->{out[len(out) - b.ndim:]}", dy.astype(rdt)).astype(b.dtype)
  return dx, dw, db


_dense.defvjp(_dense_fwd, _dense_bwd)
