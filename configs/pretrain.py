"""Pretraining config: `--config configs/pretrain.py:variant=tiny` (also small/base/large/huge)."""
from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, variant="tiny", runlocal=False)
  config = common.ml_collections.ConfigDict()
  config.model = common.model_config(a.variant)
  config.mesh = common.mesh_config()
  config.logical_axis_rules = common.LOGICAL_AXIS_RULES
  config.seed = 0
  return config
