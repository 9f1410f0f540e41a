"""Empty packed segment slots pool to zeros in the JAX model and the PyTorch port; filled slots are unchanged."""
import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.interop import torch_layout as layout_lib
from ovenc_jax.interop import torch_model

P = 14


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(2, 24, P * P * 3), dtype=np.uint8)
  pos = rng.integers(0, 6, size=(2, 24, 3)).astype(np.int32)
  # Row 0: segments 1 and 3 (slot 2 empty), tail padding; row 1: only segment 1 (slots 2, 3 empty).
  seg = np.stack([np.r_[np.full(10, 1), np.full(8, 3), np.zeros(6)], np.r_[np.full(16, 1), np.zeros(8)]])
  return x, pos, seg.astype(np.int32)


@pytest.mark.slow
def test_empty_slots_are_zero_in_jax_and_torch():
  enc = model_lib.encoder_from_config(model_defaults.model_config("tiny"))
  x, pos, seg = _inputs()
  params = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(enc.init)(jax.random.key(1), x, pos, seg)["params"]))
  apply = jax.jit(lambda s, k: enc.apply({"params": params}, x, pos, s, num_segments=k), static_argnums=1)
  pooled = np.asarray(apply(seg, 3)["pooled"])
  empty = np.array([[False, True, False], [False, True, True]])
  np.testing.assert_array_equal(pooled[empty], 0.0)
  assert np.all(np.abs(pooled[~empty]).sum(-1) > 1.0)
  # A filled slot's vector does not depend on how many slots the row has.
  np.testing.assert_allclose(pooled[:, 0], np.asarray(apply(seg, 1)["pooled"])[:, 0], rtol=1e-5, atol=1e-5)

  arch = layout_lib.arch_from_flax(params)
  model = torch_model.OVEncoder(arch)
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in layout_lib.flax_to_torch(params, arch).items()})
  with torch.no_grad():
    t = model(x, pos, segment_ids=seg, num_segments=3)["pooled"].numpy()
  np.testing.assert_array_equal(t[empty], 0.0)
  np.testing.assert_allclose(t, pooled, rtol=1e-4, atol=1e-4)
