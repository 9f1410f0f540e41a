"""The loss tests' shared pieces: a dense float64 reference of the default recipe, its gradient tolerance, the mesh."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")
# The trainer's layout under the default logical axis rules: rows over data and fsdp, centers over all.
BATCH_AXES = ("data", "fsdp")
CLASS_AXES = ("data", "fsdp", "tensor")


def mesh(shape=(2, 2, 2)) -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), AXES)


def dense_reference(emb, centers, labels, num_classes, scale, margin, thr, allowed=None):
  """Plain single-device loss in float64: every valid label of row b is a softmax of its positive
  (cosine minus margin) against all classes that are not labels of b (cos <= thr; in `allowed`)."""
  labels = np.asarray(labels)
  b = labels.shape[0]
  own = np.zeros((b, num_classes), bool)
  for i in range(b):
    for y in labels[i]:
      if y >= 0:
        own[i, y] = True
  neg_ok = ~own if allowed is None else ~own & allowed[None, :]

  def f(e, c):
    e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
    c = c / jnp.linalg.norm(c, axis=1, keepdims=True)
    cos = e @ c.T
    neg = neg_ok if thr is None else neg_ok & (cos <= thr)
    z = jnp.where(neg, scale * cos, -jnp.inf)
    rows, slots = np.nonzero(labels >= 0)  # one term per valid (row, label) entry
    zp = scale * (cos[rows, labels[rows, slots]] - margin)
    terms = jax.nn.logsumexp(jnp.concatenate([zp[:, None], z[rows]], axis=1), axis=1) - zp
    return jnp.mean(terms)

  with jax.enable_x64(True):
    v, (ge, gc) = jax.value_and_grad(f, argnums=(0, 1))(
        np.asarray(emb, np.float64), np.asarray(centers[:num_classes], np.float64))
    return float(v), np.asarray(ge), np.asarray(gc)


def close_grads(got, ref):
  # float32 at s=64: a dense float32 computation of this reference is itself off the float64
  # values by a small multiple of float32 rounding times max|g|, so entries near zero need an
  # absolute floor on top of rtol.
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=3e-5 * np.abs(ref).max())
