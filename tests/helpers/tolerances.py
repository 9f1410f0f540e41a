"""Tolerances for comparing one computation run on different meshes, process counts or microbatch splits."""
import numpy as np

# Why relative, and why this size: a float32 sum of n terms, reordered, moves by up to about
# n * u * sum|x_i| (u = 2**-24 ~ 6e-8), and by about sqrt(n) * u * sum|x_i| in practice. Changing the
# mesh (8 -> 4 devices, 1 -> 2 processes) or the microbatch split changes the order of every reduction in
# the step: the loss mean, the all-reduced gradients and the ~1e3-1e4-term dot products inside the model.
# With n ~ 1e4 that is ~100 u ~ 6e-6 relative per reduction; a few optimiser steps then carry the
# parameter differences forward with a gain of order one (Adam normalises the update size). 2e-5 relative
# is ~330 float32 ulps: about 3x that budget, and still 50x tighter than a real bug (a wrong shard or a
# dropped microbatch moves the loss by 1e-3 or more). An absolute 1e-6 on a loss of 15 is one ulp, so its
# outcome depended on the CPU's instruction mix. Same program on the same mesh stays bitwise.
FP32_REORDER_RTOL = 2e-5


def assert_reorder_close(actual, desired, rtol=FP32_REORDER_RTOL, scale=None, err_msg=""):
  """actual == desired up to float32 reduction-order error, relative to `scale` (default: max |desired|).

  Pass the magnitude of the whole computation as `scale` where a part of it is pure cancellation (a
  gradient leaf that is ~0 is rounding noise of the others, so only its size against theirs means anything).
  """
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  if scale is None:
    scale = float(np.abs(desired).max(initial=0.0))
  scale = max(scale, np.finfo(np.float32).tiny)
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=err_msg)
