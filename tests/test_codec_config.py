"""PatchifyConfig.validate (data_prep.codec.config): every bad value names its key."""
import pytest

from data_prep.codec import config


@pytest.mark.parametrize("key,value", [
    ("budget", 0.0), ("budget", 1.5), ("num_frames", 0), ("image_size", 100),
    ("fusion", "median"), ("motion_weight", -1.0), ("residual_floor", 0),
    ("residual_floor", 2.5), ("image_budget", 2.0), ("resize_interpolation", "NOPE"),
    ("static_threshold", -1.0), ("min_side", 0)])
def test_config_errors_name_the_key(key, value):
  with pytest.raises(ValueError, match=f"config {key}="):
    config.PatchifyConfig(**{key: value}).validate()
