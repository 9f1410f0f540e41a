"""`pod=NAME` presets: each builds a config that validates, fills its pod's devices and shards its state."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from ovenc_jax.configs import common
from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.configs import pretrain
from ovenc_jax.model import attention as attn_lib
from ovenc_jax.model import encoder as model_lib
from ovenc_jax import sharding as sharding_lib
from ovenc_jax.train import trainer as train_lib

HBM_GIB = {"v5e-256": 16, "v5p-128": 95, "h100x8": 80}
CASES = [(pod, v) for pod, p in common.POD_PRESETS.items() for v in p["variants"]]


@functools.lru_cache(maxsize=None)
def _abstract_params(variant):
  cfg = model_defaults.model_config(variant)
  enc = model_lib.encoder_from_config(cfg)
  n = 256
  args = (jnp.zeros((1, n, 14 * 14 * 3), jnp.uint8), jnp.zeros((1, n, 3), jnp.int32), jnp.ones((1, n), jnp.int32))
  return jax.eval_shape(enc.init, jax.random.key(0), *args)["params"]


@pytest.mark.parametrize("pod, variant", CASES)
def test_preset_builds_a_valid_config(pod, variant):
  cfg = pretrain.get_config(f"variant={variant},pod={pod}")
  preset = common.POD_PRESETS[pod]
  train_lib.validate_config(cfg)
  model_lib.validate_model_config(cfg.model)
  shape = sharding_lib.mesh_shape(cfg.mesh, preset["devices"])
  assert math.prod(shape) == preset["devices"]
  sizes = dict(zip(sharding_lib.MESH_AXES, shape))
  mesh = jax.sharding.AbstractMesh(shape, sharding_lib.MESH_AXES)
  sharding_lib.validate_divisibility(cfg.model, mesh)
  assert cfg.input.global_batch_size % (sizes["data"] * sizes["fsdp"]) == 0
  assert cfg.model.dtype == "bfloat16" and cfg.model.grad_reduce_dtype == "float32"
  assert cfg.model.remat in model_lib.REMAT_POLICIES
  assert attn_lib.resolve(cfg.model.attention, preset["platform"], cfg.model.dtype) == \
      {"tpu": "splash", "gpu": "cudnn"}[preset["platform"]]
  if cfg.model.attention == "splash":  # splash blocks are multiples of 128 dividing the row
    assert cfg.input.tokens_per_row % 128 == 0

  # Parameters + AdamW's two moments (fp32) per device under the config's own sharding rules: within
  # 1.25x of the total over fsdp * tensor (only norms and biases stay replicated) and far inside HBM.
  boxed = _abstract_params(variant)
  per_device = total = 0
  for leaf, spec in zip(jax.tree.leaves(nn.meta.unbox(boxed)),
                        jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.P))):
    axes = nn.logical_to_mesh_axes(spec, cfg.logical_axis_rules)
    split = math.prod(sizes[a] for entry in axes if entry for a in ((entry,) if isinstance(entry, str) else entry))
    nbytes = 3 * 4 * math.prod(leaf.shape)
    total += nbytes
    per_device += nbytes / split
  shards = sizes["fsdp"] * sizes["tensor"]
  assert per_device <= 1.25 * total / shards, (per_device, total / shards)
  assert per_device < 0.1 * HBM_GIB[pod] * 2 ** 30


def test_preset_errors_name_the_arg():
  with pytest.raises(ValueError, match="pod='v4-8' is unknown"):
    pretrain.get_config("variant=base,pod=v4-8")
  with pytest.raises(ValueError, match="pod='h100x8' has no preset for variant='tiny'"):
    pretrain.get_config("variant=tiny,pod=h100x8")
  plain = pretrain.get_config("variant=base")
  assert plain.model.dtype == "float32" and plain.mesh.data == -1  # no pod: nothing changes


def _tiny_trainer(**updates):
  cfg = pretrain.get_config("tiny")
  for key, value in updates.items():
    section, _, name = key.rpartition(".")
    cfg[section][name] = value
  return train_lib.Trainer(cfg, workdir="")


def test_center_rows_pad_to_the_row_multiple():
  """loss.center_row_multiple pads the table to that multiple (and the shard count's); a bad value is
  an error naming the key. GPU presets set 2048: 256 rows a GPU on 8 GPUs."""
  assert common.POD_PRESETS["h100x8"]["loss"]["center_row_multiple"] == 2048
  for multiple in (128, 2048):
    t = _tiny_trainer(**{"loss.num_classes": 1000, "loss.center_row_multiple": multiple})
    rows = t.abstract_state["params"]["centers"].shape[0]
    assert rows == -(-1000 // multiple) * multiple, (multiple, rows)
  with pytest.raises(ValueError, match="loss.center_row_multiple"):
    _tiny_trainer(**{"loss.num_classes": 1000, "loss.center_row_multiple": 0})


@pytest.mark.parametrize("pack, segments, expected", [(True, 1, True), (True, 4, False), (False, 4, True)])
def test_train_encoder_knows_when_rows_hold_one_sample(pack, segments, expected):
  """The train step's encoder may take sequence lengths (cuDNN) only where every row is one sample."""
  t = _tiny_trainer(**{"input.pack": pack, "input.max_segments": segments})
  assert t.train_encoder.one_sample_rows is expected
  assert t.encoder.one_sample_rows is False  # embedding and evaluation keep the mask
