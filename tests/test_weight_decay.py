"""Weight decay by name: only kernels decay, never norms, biases (incl. the [heads, head_dim] q/k/v ones), the probe."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovenc_jax.loss.centers import init_centers
from ovenc_jax.loss.defaults import default_loss_config
from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import optim
from ovenc_jax.train.defaults import default_optim_config


def _paths(tree):
  return {"/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _expected_decayed(depth):
  """Written out by role: every projection / MLP / patch-embedding matrix, nothing else."""
  attn = [f"{p}_proj/kernel" for p in ("q", "k", "v", "out")]
  mlp = ["mlp/fc1/kernel", "mlp/fc2/kernel"]
  out = {"patch_embedding/kernel"}
  for i in range(depth):
    out |= {f"layers_{i}/self_attn/{a}" for a in attn} | {f"layers_{i}/{m}" for m in mlp}
  return out | {f"head/attention/{a}" for a in attn} | {f"head/{m}" for m in mlp}


def _init(variant):
  enc = model_lib.encoder_from_config(model_defaults.model_config(variant))
  x = (jnp.zeros((1, 4, 14 * 14 * 3), jnp.uint8), jnp.zeros((1, 4, 3), jnp.int32), jnp.ones((1, 4), jnp.int32))
  return enc, x


def test_base_mask_is_exactly_the_kernels():
  enc, x = _init("base")
  params = jax.eval_shape(enc.init, jax.random.key(0), *x)["params"]
  mask = _paths(optim._decay_mask(params))
  expected = _expected_decayed(12)
  assert expected <= set(mask)
  for path, decayed in mask.items():
    assert decayed == (path in expected), path
  # The case the rank rule got wrong: 2-D biases of the q/k/v projections.
  assert _paths(params)["layers_0/self_attn/q_proj/bias"].ndim == 2
  assert not mask["layers_0/self_attn/q_proj/bias"]


def test_zero_gradient_step_shrinks_only_the_kernels():
  enc, x = _init("tiny")
  params = {"encoder": jax.jit(enc.init)(jax.random.key(0), *x)["params"],
            "centers": init_centers(jax.random.key(1), 8, 128, 8)}
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  o = default_optim_config()
  o.update(lr=0.1, warmup_steps=0, weight_decay=0.5)
  lc = default_loss_config()
  tx = optim.make_optimizer(o, lc, total_steps=10)
  updates = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(params)
  expected = _expected_decayed(2)
  for path, u in _paths(updates["encoder"]).items():
    p = _paths(params["encoder"])[path]
    # AdamW with a zero gradient: update = -lr * wd * p on decayed leaves, 0 elsewhere.
    want = -0.1 * 0.5 * np.asarray(p) if path in expected else np.zeros(p.shape)
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, atol=1e-9, err_msg=path)
  np.testing.assert_array_equal(np.asarray(updates["centers"]), 0.0)
