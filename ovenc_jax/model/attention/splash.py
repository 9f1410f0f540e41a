"""Pallas splash (flash) attention for TPU with segment ids for packed rows, run per device in shard_map.

The kernel never scales q (we do), needs block sizes that are multiples of 128 dividing the row length
(rows are padded up to a multiple of 128 with a segment id of their own), and is a Mosaic custom call
that XLA cannot partition, so it runs inside `jax.shard_map` over the batch and heads mesh axes. Off
TPU it runs in Pallas interpret mode (tests on CPU). `make_splash_mha` has no way to pass a
`pallas_call(cost_estimate=...)`, without which XLA's cost analysis counts these kernels as 0 FLOPs
and their operands once; `_CostedPallas` gives each kernel its FLOPs and HBM traffic.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as _kernel_module

from ovenc_jax import sharding

LANES = 128
BLOCK_CANDIDATES = (512, 256, 128)
# Rows padded up to a multiple of 128 get this segment id: they attend only to each other, so no
# row is fully masked and no real (or padding, 0) token sees them.
PAD_SEGMENT = -1
ACTIVATION_NAMES = ("batch", "length", "act_heads", "kv")


def kernel_cost(phase: str, q, k, v, num_q_blocks: int, num_kv_blocks: int,
                residuals: bool = True) -> pl.CostEstimate:
  """FLOPs, exponentials and HBM bytes of one splash kernel call on q [H, Sq, d], k/v [H, Sk, d].

  A flash kernel streams blocks, and Pallas copies a block in only when its index differs from the
  previous grid step's. The forward (grid heads x q blocks x k blocks) reads q once, k and v once
  per head (once per query block when there are several key blocks), and writes o and, when it
  keeps residuals for a backward, the logsumexp broadcast over 128 lanes in fp32 ([H, Sq, 128]; XLA
  then slices lane 0). The fused backward (dkv; grid k blocks x heads x q blocks) reads k and v once,
  q, dO, logsumexp and di once per key block, writes dk and dv, and writes dq partials per key
  block in fp32 (XLA sums them). Segment ids reach the kernels broadcast: q's over 128 lanes
  ([Sq, 128] int32) and k's over 8 sublanes ([8, Sk]) in the forward, the other way round in the
  backward, re-read whenever their block index changes. The segment mask is applied inside each
  block (no block is skipped), so every score is computed: forward 2 matmuls over Sq x Sk,
  backward 4 plus the recomputed scores.
  """
  h, sq, d = q.shape
  sk = k.shape[1]
  e = q.dtype.itemsize
  nq, nk = num_q_blocks, num_kv_blocks
  qo = h * sq * d * e          # q, o, dO or dq in the compute dtype
  kv = h * sk * d * e          # k or v
  lanes, sublanes = 4 * LANES, 4 * 8   # bytes of one segment id broadcast over lanes / sublanes
  if phase in ("fwd", "dq"):   # grid (heads, q blocks, k blocks)
    q_seg = lanes * sq * (h if nq > 1 else 1)        # block index follows the q block only
    kv_seg = sublanes * sk * (h * nq if nk > 1 else 1)
    kv_reads = 2 * kv * (nq if nk > 1 else 1)
  if phase == "fwd":
    lse = 4 * h * sq * LANES if residuals else 0
    nbytes = qo + kv_reads + qo + lse + q_seg + kv_seg
    flops = 4 * h * sq * sk * d
  elif phase == "dkv":
    q_seg = sublanes * sq * (nk * h if nq > 1 else 1)
    kv_seg = lanes * sk                               # once per key block
    nbytes = 2 * kv + nk * (2 * qo + 8 * h * sq) + q_seg + kv_seg + 2 * kv + nk * h * sq * d * 4
    flops = 10 * h * sq * sk * d
  else:  # dq-only backward (unfused): q, dO, logsumexp and di once, k, v as in the forward, dq written.
    nbytes = 2 * qo + 8 * h * sq + kv_reads + q_seg + kv_seg + qo
    flops = 8 * h * sq * sk * d
  return pl.CostEstimate(flops=int(flops), transcendentals=int(h * sq * sk), bytes_accessed=int(nbytes))


class _CostedPallas:
  """The `pl` module as the splash kernel module sees it, with every `pallas_call` given a cost estimate.

  The kernel module builds its three pallas_calls (fwd, dq, dkv) internally and takes no estimate;
  this wraps the one name it calls through (`pl.pallas_call`) and forwards everything else. The
  kernel name (`splash_mha_<phase>...`) says which phase; q/k/v follow the three scalar-prefetch
  operands; the grid gives the block counts.
  """

  def __init__(self, module):
    self._module = module

  def __getattr__(self, name):
    return getattr(self._module, name)

  def pallas_call(self, kernel, *args, name: str = "", grid_spec=None, cost_estimate=None, **kw):
    call = functools.partial(self._module.pallas_call, kernel, *args, name=name, grid_spec=grid_spec, **kw)
    phase = next((p for p in ("fwd", "dkv", "dq") if f"_{p}" in name), None)
    if cost_estimate is not None or phase is None or grid_spec is None:
      return call(cost_estimate=cost_estimate)

    def with_cost(*operands):
      q, k, v = operands[3:6]
      # fwd/dq grid: (heads, query blocks, key blocks); dkv grid: (key blocks, heads, query blocks).
      grid = grid_spec.grid
      nq, nk = (grid[2], grid[0]) if phase == "dkv" else (grid[1], grid[2])
      return call(cost_estimate=kernel_cost(phase, q, k, v, nq, nk,
                                            residuals="no_residuals" not in name))(*operands)

    return with_cost


if not isinstance(_kernel_module.pl, _CostedPallas):
  _kernel_module.pl = _CostedPallas(_kernel_module.pl)


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


def attention(q, k, v, q_segments, kv_segments, *, scale, axis_rules=(), interpret=None,
              heads_first=False, **_):
  """q [B, Nq, H, hd], k/v [B, Nk, H, hd] (self-attention: Nq == Nk) -> [B, Nq, H, hd]; with
  heads_first all four are [B, H, N, hd], the kernel's own layout (no transposes)."""
  seq, heads = (2, 1) if heads_first else (1, 2)  # axes of q, k, v
  if q.shape[seq] != k.shape[seq]:
    raise ValueError(f"splash attention is for self-attention; got {q.shape[seq]} queries, "
                     f"{k.shape[seq]} keys")
  mesh = jax.sharding.get_abstract_mesh()
  if interpret is None:  # a TPU target compiled from a CPU host gets the Mosaic kernel
    interpret = sharding.mesh_platform() != "tpu"
  n = q.shape[seq]
  pad = -n % LANES
  if heads_first:
    to_kernel = lambda t: jnp.pad(t, ((0, 0), (0, 0), (0, pad), (0, 0)))
  else:
    to_kernel = lambda t: jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2)
  pad_seg = lambda s: jnp.pad(s.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
  args = (to_kernel(q * jnp.asarray(scale, q.dtype)), to_kernel(k), to_kernel(v),
          pad_seg(q_segments), pad_seg(kv_segments))
  local = lambda *a: _local_attention(*a, interpret=interpret)
  if not mesh.empty:
    # Mosaic kernels are not partitioned automatically: each device runs its own batch rows and heads.
    b_axes, _, h_axes, _ = nn.logical_to_mesh_axes(ACTIVATION_NAMES, tuple(axis_rules)) if axis_rules \
        else (None,) * 4
    b_axes, h_axes = _dividing(b_axes, q.shape[0], mesh), _dividing(h_axes, q.shape[heads], mesh)
    qkv_spec = jax.P(b_axes, h_axes, None, None)
    seg_spec = jax.P(b_axes, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2,
                          out_specs=qkv_spec, check_vma=False)
  out = local(*args)
  return out[:, :, :n] if heads_first else out.swapaxes(1, 2)[:, :n]
