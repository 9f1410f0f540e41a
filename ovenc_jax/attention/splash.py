"""Pallas splash (flash) attention for TPU with segment ids for packed rows, run per device in shard_map.

The kernel never scales q (we do), needs block sizes that are multiples of 128 dividing the row length
(rows are padded up to a multiple of 128 with a segment id of their own), and is a Mosaic custom call
that XLA cannot partition, so it runs inside `jax.shard_map` over the batch and heads mesh axes. Off
TPU it runs in Pallas interpret mode (tests on CPU). `make_splash_mha` has no way to pass a
`pallas_call(cost_estimate=...)`, so XLA's cost analysis counts these kernels as 0 FLOPs.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128
BLOCK_CANDIDATES = (512, 256, 128)
# Rows padded up to a multiple of 128 get this segment id: they attend only to each other, so no
# row is fully masked and no real (or padding, 0) token sees them.
PAD_SEGMENT = -1
ACTIVATION_NAMES = ("batch", "length", "act_heads", "kv")


def block_size(seq_len: int) -> int:
  """The largest candidate block (a multiple of 128) that divides seq_len."""
  for b in BLOCK_CANDIDATES:
    if seq_len % b == 0:
      return b
  raise ValueError(f"splash attention: row length {seq_len} is not a multiple of {LANES}")


def block_sizes(seq_len: int) -> splash.BlockSizes:
  b = block_size(seq_len)
  return splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, use_fused_bwd_kernel=True)


def _local_attention(q, k, v, q_seg, kv_seg, *, interpret):
  """q/k/v [b, H, S, hd] (q already scaled), segments [b, S] -> [b, H, S, hd], on one device."""
  _, h, s, _ = q.shape
  kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((s, s))] * h),
                                  block_sizes=block_sizes(s), head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  per_example = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(q=qs, kv=ks))
  return jax.vmap(per_example)(q, k, v, q_seg, kv_seg)


def _dividing(axes, size, mesh):
  """`axes` if their mesh size divides `size`, else None (replicated): e.g. the batch-1 example that
  initialises the parameters under the training mesh."""
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return axes if size % int(np.prod([mesh.shape[a] for a in names])) == 0 else None


def attention(q, k, v, q_segments, kv_segments, *, scale, axis_rules=(), interpret=None, **_):
  """q [B, Nq, H, hd], k/v [B, Nk, H, hd] (self-attention: Nq == Nk) -> [B, Nq, H, hd]."""
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"splash attention is for self-attention; got {q.shape[1]} queries, {k.shape[1]} keys")
  mesh = jax.sharding.get_abstract_mesh()
  if interpret is None:
    # The mesh's devices decide, not the local backend: compiling for TPU targets from a CPU host
    # must emit the Mosaic kernel, not the interpreter.
    device = None if mesh.empty else mesh.abstract_device
    interpret = (device.platform if device is not None else jax.default_backend()) != "tpu"
  n = q.shape[1]
  pad = -n % LANES
  to_kernel = lambda t: jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2)
  pad_seg = lambda s: jnp.pad(s.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
  args = (to_kernel(q * jnp.asarray(scale, q.dtype)), to_kernel(k), to_kernel(v),
          pad_seg(q_segments), pad_seg(kv_segments))
  local = lambda *a: _local_attention(*a, interpret=interpret)
  if not mesh.empty:
    # Mosaic kernels are not partitioned automatically: each device runs its own batch rows and heads.
    b_axes, _, h_axes, _ = nn.logical_to_mesh_axes(ACTIVATION_NAMES, tuple(axis_rules)) if axis_rules \
        else (None,) * 4
    b_axes, h_axes = _dividing(b_axes, q.shape[0], mesh), _dividing(h_axes, q.shape[2], mesh)
    qkv_spec = jax.P(b_axes, h_axes, None, None)
    seg_spec = jax.P(b_axes, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2,
                          out_specs=qkv_spec, check_vma=False)
  out = local(*args)
  return out.swapaxes(1, 2)[:, :n]
