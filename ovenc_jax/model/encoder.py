"""OV-Encoder ViT (Flax linen): sparse (t, h, w) tokens, shared 3D RoPE, segment masks, probe pooling."""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovenc_jax.model import attention as attn_lib
from ovenc_jax.model import defaults
from ovenc_jax.model import fused_mlp
from ovenc_jax.model import precision
from ovenc_jax.model import rope as rope_lib
from ovenc_jax import sharding as sharding_lib

# CLIP pixel statistics, applied when patches arrive as uint8.
CLIP_MEAN = np.array(defaults.CLIP_MEAN, np.float32)
CLIP_STD = np.array(defaults.CLIP_STD, np.float32)
LN_EPS = defaults.NORM_EPS

_SIZES = defaults.sizes(defaults.DEFAULT_VARIANT)
_dense_init = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()

# 'auto' decides per trace (fused_mlp.auto_picks_kernel): the fused kernel on TPU meshes whose tensor
# axis does not split the MLP; XLA elsewhere (off TPU the kernel would run in interpret mode).
MLP_KERNELS = ("auto", "xla", "pallas")

REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def normalize_pixels(patches: jnp.ndarray) -> jnp.ndarray:
  """uint8 [..., p*p*3] -> CLIP-normalised float32; float input passes through unchanged."""
  if patches.dtype != jnp.uint8:
    return patches.astype(jnp.float32)
  x = patches.astype(jnp.float32).reshape(*patches.shape[:-1], -1, 3) / 255.0
  x = (x - CLIP_MEAN) / CLIP_STD
  return x.reshape(patches.shape)


class _Module(nn.Module):
  """Holds the logical-axis plumbing and the precision policy (ovenc_jax/model/precision.py) of every layer."""
  dtype: Any = jnp.dtype(defaults.FIELDS["dtype"])
  axis_rules: Sequence[tuple[str, Any]] = ()
  grad_reduce_dtype: Any = jnp.dtype(defaults.FIELDS["grad_reduce_dtype"])

  def _kw(self):
    return dict(dtype=self.dtype, axis_rules=self.axis_rules, grad_reduce_dtype=self.grad_reduce_dtype)

  def _p(self, name, init, shape, names):
    return self.param(name, nn.with_logical_partitioning(init, names), shape, precision.PARAM_DTYPE)

  def _dense(self, spec, x, kernel, bias, names=None):
    """`names`: the kernel's logical axes, for FSDP (precision.fsdp_specs) under the axis rules."""
    fsdp = None
    if self.axis_rules and names is not None:
      rules = tuple(self.axis_rules)
      fsdp = precision.fsdp_specs(nn.logical_to_mesh_axes(names, rules),
                                  nn.logical_to_mesh_axes(("batch",), rules)[0])
    return precision.dense(spec, x, kernel, bias, self.dtype, self.grad_reduce_dtype, fsdp)

  def _constrain(self, x, names):
    if not self.axis_rules:
      return x
    return nn.with_logical_constraint(x, names, rules=tuple(self.axis_rules))

  def _stored_spec(self, names):
    return nn.logical_to_mesh_axes(names, tuple(self.axis_rules))


class LayerNorm(_Module):
  eps: float = LN_EPS
  params_only: bool = False  # return (scale, bias) for a fused kernel instead of applying them

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self._p("scale", _ones, (d,), ("norm",))
    bias = self._p("bias", _zeros, (d,), ("norm",))
    if self.params_only:
      return scale, bias
    return precision.layer_norm(x, scale, bias, self.eps).astype(self.dtype)


class RMSNorm(_Module):
  eps: float = LN_EPS

  @nn.compact
  def __call__(self, x):
    scale = self._p("scale", _ones, (x.shape[-1],), ("norm",))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps) * scale
    return y.astype(self.dtype)


class Linear(_Module):
  """y = x W + b with W [in, out]; logical names (in_name, out_name)."""
  features: int = 0
  names: tuple[str, str] = ("embed", "mlp")
  use_bias: bool = True
  params_only: bool = False  # return (kernel, bias) for a fused kernel instead of applying them

  @nn.compact
  def __call__(self, x):
    kernel = self._p("kernel", _dense_init, (x.shape[-1], self.features), self.names)
    bias = self._p("bias", _zeros, (self.features,), (self.names[1],)) if self.use_bias else None
    if self.params_only:
      return kernel, bias
    lead = "abcdefg"[:x.ndim - 1]
    return self._dense(f"{lead}i,io->{lead}o", x, kernel, bias, self.names)


class HeadProjection(_Module):
  """[B, N, D] -> [B, N, H, hd] (heads_first: [B, H, N, hd]; q/k/v projections), kernel [D, H, hd]
  sharded over heads."""
  num_heads: int = 1
  head_dim: int = 64
  heads_first: bool = False
  defer_bias: bool = False  # return (x W, bias): the caller applies the bias (Attention, to v)
  params_only: bool = False  # return (kernel, bias) (Attention's pooling path)

  @nn.compact
  def __call__(self, x):
    kernel = self._p("kernel", _dense_init, (x.shape[-1], self.num_heads, self.head_dim),
                     ("embed", "heads", "kv"))
    bias = self._p("bias", _zeros, (self.num_heads, self.head_dim), ("heads", "kv"))
    if self.params_only:
      return kernel, bias
    spec = "bnd,dhk->bhnk" if self.heads_first else "bnd,dhk->bnhk"
    if self.defer_bias:
      return self._dense(spec, x, kernel, None, ("embed", "heads", "kv")), bias
    return self._dense(spec, x, kernel, bias, ("embed", "heads", "kv"))


class OutProjection(_Module):
  """[B, N, H, hd] (heads_first: [B, H, N, hd]) -> [B, N, D], kernel [H, hd, D]."""
  features: int = 0
  heads_first: bool = False

  @nn.compact
  def __call__(self, x, v_bias=None):
    """v_bias [H, hd]: a bias of the attention's values, applied here as kernel-mapped output bias."""
    h, k = (x.shape[1], x.shape[3]) if self.heads_first else x.shape[-2:]
    kernel = self._p("kernel", _dense_init, (h, k, self.features), ("heads", "kv", "embed"))
    bias = self._p("bias", _zeros, (self.features,), ("norm",))
    if v_bias is not None:
      bias = bias + jnp.einsum("hk,hkd->d", v_bias, kernel)
    spec = "bhnk,hkd->bnd" if self.heads_first else "bnhk,hkd->bnd"
    return self._dense(spec, x, kernel, bias, ("heads", "kv", "embed"))


class Attention(_Module):
  """Multi-head attention; RoPE on q and k when angles are given (self-attention)."""
  num_heads: int = 1
  rope_layout: str = "official"
  impl: str = "xla"
  chunk_size: int = 512
  pool: bool = False  # a few queries over a long row without RoPE (the probe head): see _pool
  one_sample_rows: bool = False  # each row is one sample then padding (Encoder.one_sample_rows)

  @nn.compact
  def __call__(self, x_q, x_kv, q_segments, kv_segments, angles=None):
    d = x_kv.shape[-1]
    hd = d // self.num_heads
    if self.pool:
      return self._pool(x_q, x_kv, q_segments, kv_segments, hd)
    # The splash kernel takes [B, H, N, hd]: the projections write that layout themselves (their
    # matmuls' output order), instead of XLA transposing q, k, v and the output around every call.
    heads_first = self.impl in attn_lib.HEADS_FIRST
    kw = dict(self._kw(), num_heads=self.num_heads, head_dim=hd, heads_first=heads_first)
    q = HeadProjection(name="q_proj", **kw)(x_q)
    k = HeadProjection(name="k_proj", **kw)(x_kv)
    # In self-attention every query sees at least one key (padding sees padding: segment_mask), so
    # each row of attention weights sums to one and v's bias passes through unchanged: it is added
    # after the output projection, as b_v W_o, instead of to every key (on GPU a pass over v each
    # way). Not for the heads-first TPU kernel, where XLA's own fusion of the bias is cheaper.
    fold_v_bias = x_q is x_kv and not heads_first
    v = HeadProjection(name="v_proj", defer_bias=fold_v_bias, **kw)(x_kv)
    v, v_bias = v if fold_v_bias else (v, None)
    if angles is not None:
      q = rope_lib.apply_rope(q, angles, self.rope_layout, heads_first)
      k = rope_lib.apply_rope(k, angles, self.rope_layout, heads_first)
    names = ("batch", "act_heads", "length", "kv") if heads_first else ("batch", "length", "act_heads", "kv")
    q, k, v = (self._constrain(t, names) for t in (q, k, v))
    o = attn_lib.dot_product_attention(q, k, v, q_segments, kv_segments, impl=self.impl,
                                       chunk_size=self.chunk_size, axis_rules=self.axis_rules,
                                       heads_first=heads_first, one_sample_rows=self.one_sample_rows)
    o = self._constrain(o, names)
    return OutProjection(name="out_proj", features=d, heads_first=heads_first, **self._kw())(o, v_bias)

  def _pool(self, x_q, x, q_segments, kv_segments, hd):
    """Attention of S queries a row over its N tokens, with keys and values left in x's space.

    q . (x W_k + b_k) = (W_k q) . x + q . b_k, and the last term is the same for every key of a query,
    so softmax drops it; sum_t p_t (x_t W_v + b_v) = (sum_t p_t x_t) W_v + b_v where the weights sum to
    one (a query with no key of its segment spreads over the whole row, as in xla._attend). So the
    queries are mapped into x's space and the values pooled there: two [S, D] x [D, N] products a row
    instead of projecting all N tokens to keys and values and reading them back.

    The two small per-head products go through `dense` (its FSDP gather and reduce-scatter) as
    block-diagonal ones: a head's query against every head's slice of W_k, W_v against every head's
    pooled x, and the diagonal kept (H times the FLOPs of S x D x D, small beside the row's)."""
    kw = dict(self._kw(), num_heads=self.num_heads, head_dim=hd)
    q = HeadProjection(name="q_proj", **kw)(x_q)                                          # [B, S, H, hd]
    wk, _ = HeadProjection(name="k_proj", params_only=True, **kw)(x)
    wv, bv = HeadProjection(name="v_proj", params_only=True, **kw)(x)
    f32, cdt = jnp.float32, self.dtype
    eye = jnp.eye(self.num_heads, dtype=q.dtype)
    names = ("embed", "heads", "kv")
    qx = self._dense("bsghk,dhk->bsgd", q[:, :, :, None, :] * eye[:, :, None], wk, None, names)  # [B, S, H, D]
    logits = jnp.einsum("bshd,btd->bsht", qx, x.astype(cdt), preferred_element_type=f32)
    bias = jnp.where(q_segments[:, :, None, None] == kv_segments[:, None, None, :], 0.0,
                     attn_lib.xla.large_negative(f32))
    logits = logits * jnp.asarray(hd ** -0.5, f32) + bias
    p = jax.nn.softmax(logits, axis=-1).astype(cdt)
    pooled = jnp.einsum("bsht,btd->bshd", p, x.astype(cdt), preferred_element_type=f32)   # [B, S, H, D]
    o = jnp.einsum("bsghk,gh->bsgk", self._dense("bsgd,dhk->bsghk", pooled, wv, bv, names), eye)
    return OutProjection(name="out_proj", features=x.shape[-1], **self._kw())(o)


class Mlp(_Module):
  mlp_dim: int = 0
  params_only: bool = False  # return (fc1 kernel, fc1 bias, fc2 kernel, fc2 bias) for a fused kernel

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kw = dict(self._kw(), params_only=self.params_only)
    # fc1 hands over its parameters: its bias is added inside the activation, whose backward then
    # keeps only the matmul's output (precision.bias_gelu).
    fc1 = Linear(name="fc1", features=self.mlp_dim, names=("embed", "mlp"), **dict(kw, params_only=True))
    fc2 = Linear(name="fc2", features=d, names=("mlp", "embed"), **kw)
    if self.params_only:  # the fused kernel's operands, created as the layers below create them
      return fc1(x) + fc2(jax.ShapeDtypeStruct((1, self.mlp_dim), x.dtype))
    kernel, bias = fc1(x)
    lead = "abcdefg"[:x.ndim - 1]
    y = self._dense(f"{lead}i,io->{lead}o", x, kernel, None, ("embed", "mlp"))
    h = self._constrain(precision.bias_gelu(y, bias, self.grad_reduce_dtype), ("batch", "length", "act_mlp"))
    return fc2(h)


class EncoderLayer(_Module):
  """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x))."""
  num_heads: int = 1
  mlp_dim: int = 0
  rope_layout: str = "official"
  impl: str = "xla"
  chunk_size: int = 512
  mlp_kernel: str = "xla"
  one_sample_rows: bool = False

  @nn.compact
  def __call__(self, x, segments, angles):
    kw = self._kw()
    h = LayerNorm(name="layer_norm1", **kw)(x)
    x = x + Attention(name="self_attn", num_heads=self.num_heads, rope_layout=self.rope_layout,
                      impl=self.impl, chunk_size=self.chunk_size, one_sample_rows=self.one_sample_rows,
                      **kw)(h, h, segments, segments, angles)
    x = self._constrain(x, ("batch", "length", "act_embed"))
    specs, batch = self._mlp_layout()
    if self.mlp_kernel == "pallas" or (
        self.mlp_kernel == "auto" and fused_mlp.auto_picks_kernel(
            sharding_lib.mesh_platform(), specs, batch, x.shape[-1], self.mlp_dim, self.dtype)):
      return self._constrain(self._fused_mlp(x, specs, batch), ("batch", "length", "act_embed"))
    h = LayerNorm(name="layer_norm2", **kw)(x)
    x = x + Mlp(name="mlp", mlp_dim=self.mlp_dim, **kw)(h)
    return self._constrain(x, ("batch", "length", "act_embed"))

  def _mlp_layout(self):
    """The stored specs of (ln scale, ln bias, fc1 kernel, fc1 bias, fc2 kernel, fc2 bias) and the
    batch's mesh axes, under the axis rules (None, None without them)."""
    if not self.axis_rules:
      return None, None
    names = (("norm",), ("norm",), ("embed", "mlp"), ("mlp",), ("mlp", "embed"), ("embed",))
    return tuple(self._stored_spec(n) for n in names), self._stored_spec(("batch",))[0]

  def _fused_mlp(self, x, specs, batch):
    """x + mlp(layer_norm2(x)) in one kernel, on the same parameters as the two modules above."""
    kw = dict(self._kw(), params_only=True)
    params = LayerNorm(name="layer_norm2", **kw)(x) + Mlp(name="mlp", mlp_dim=self.mlp_dim, **kw)(x)
    return fused_mlp.mlp_block(x, *params, eps=LN_EPS, compute_dtype=self.dtype,
                               grad_reduce_dtype=self.grad_reduce_dtype, stored_specs=specs,
                               batch_axes=batch)


class ProbeHead(_Module):
  """SigLIP2-style attention pooling: one probe query per segment -> RMSNorm -> MLP residual; empty slots are 0."""
  num_heads: int = 1
  mlp_dim: int = 0

  @nn.compact
  def __call__(self, x, segments, num_segments):
    b, _, d = x.shape
    kw = self._kw()
    probe = self._p("probe", nn.initializers.xavier_uniform(), (1, 1, d), (None, None, "embed"))
    # Broadcast before the cast: the probe's gradient, a sum over rows and segments, stays fp32.
    queries = jnp.broadcast_to(probe, (b, num_segments, d)).astype(self.dtype)
    q_segments = jnp.broadcast_to(jnp.arange(1, num_segments + 1, dtype=jnp.int32), (b, num_segments))
    h = Attention(name="attention", num_heads=self.num_heads, impl="xla", pool=True, **kw)(
        queries, x, q_segments, segments)
    y = RMSNorm(name="norm", **kw)(h)
    out = h + Mlp(name="mlp", mlp_dim=self.mlp_dim, **kw)(y)
    # An empty slot's probe sees no token (its softmax spreads over the whole row): zeros instead.
    present = jnp.any(q_segments[:, :, None] == segments[:, None, :], axis=-1)
    return jnp.where(present[..., None], out, jnp.zeros_like(out))


class Encoder(_Module):
  """The OV-Encoder ViT. Returns last hidden states [B, N, D] and pooled [B, S, D] per segment.

  Field defaults are ovenc_jax.model.defaults' (the default variant's sizes); `attention='auto'`
  resolves for the current mesh's platform when traced.
  """
  patch_size: int = defaults.FIELDS["patch_size"]
  width: int = _SIZES["width"]
  depth: int = _SIZES["depth"]
  num_heads: int = _SIZES["num_heads"]
  mlp_dim: int = _SIZES["mlp_dim"]
  rope_layout: str = defaults.FIELDS["rope_layout"]
  rope_theta: float = defaults.FIELDS["rope_theta"]
  attention: str = defaults.FIELDS["attention"]
  attn_chunk_size: int = defaults.FIELDS["attn_chunk_size"]
  mlp_kernel: str = defaults.FIELDS["mlp_kernel"]  # MLP_KERNELS
  remat: str = defaults.FIELDS["remat"]
  # Set by the trainer when every input row is one sample's tokens followed by padding (no packing,
  # or one segment a row): an attention kernel may then take sequence lengths instead of a mask.
  one_sample_rows: bool = False

  @nn.compact
  def __call__(self, patches, positions, segment_ids, num_segments: int = 1):
    kw = self._kw()
    impl = attn_lib.resolve(self.attention, sharding_lib.mesh_platform(), self.dtype)
    x = normalize_pixels(patches)
    x = Linear(name="patch_embedding", features=self.width, names=("patch", "embed"),
               use_bias=False, **kw)(x)
    x = self._constrain(x, ("batch", "length", "act_embed"))
    angles = rope_lib.rope_angles(positions, self.width // self.num_heads, self.rope_theta)
    x = LayerNorm(name="layernorm_pre", **kw)(x)
    layer_cls = EncoderLayer
    if self.remat != "none":
      layer_cls = nn.remat(EncoderLayer, policy=REMAT_POLICIES[self.remat])
    for i in range(self.depth):
      x = layer_cls(name=f"layers_{i}", num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                    rope_layout=self.rope_layout, impl=impl,
                    chunk_size=self.attn_chunk_size, mlp_kernel=self.mlp_kernel,
                    one_sample_rows=self.one_sample_rows, **kw)(
                        x, segment_ids, angles)
    x = LayerNorm(name="layernorm_post", **kw)(x)
    pooled = ProbeHead(name="head", num_heads=self.num_heads, mlp_dim=self.mlp_dim, **kw)(
        x, segment_ids, num_segments)
    return {"last_hidden_state": x, "pooled": pooled}


def encoder_from_config(model_cfg, axis_rules=(), platform=None) -> Encoder:
  """Builds the Encoder from a `config.model` ConfigDict (validated first).

  `platform` ('cpu', 'tpu', 'gpu'; default: JAX's default backend) resolves `model.attention=auto`;
  pass the target's platform when compiling for devices other than the local ones.
  """
  validate_model_config(model_cfg)
  attention = attn_lib.resolve(model_cfg.attention, platform or jax.default_backend(), model_cfg.dtype)
  return Encoder(
      patch_size=model_cfg.patch_size, width=model_cfg.width, depth=model_cfg.depth,
      num_heads=model_cfg.num_heads, mlp_dim=model_cfg.mlp_dim, rope_layout=model_cfg.rope_layout,
      rope_theta=model_cfg.rope_theta, attention=attention,
      attn_chunk_size=model_cfg.attn_chunk_size, mlp_kernel=defaults.field(model_cfg, "mlp_kernel"),
      remat=model_cfg.remat, dtype=jnp.dtype(model_cfg.dtype),
      grad_reduce_dtype=jnp.dtype(defaults.field(model_cfg, "grad_reduce_dtype")), axis_rules=tuple(axis_rules))


def validate_model_config(m) -> None:
  """Raises ValueError naming the offending `model.*` key."""
  for key in ("patch_size", "width", "depth", "num_heads", "mlp_dim", "attn_chunk_size"):
    if int(m[key]) <= 0:
      raise ValueError(f"model.{key}={m[key]} must be a positive integer")
  if m.width % m.num_heads:
    raise ValueError(f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}")
  rope_lib.axis_frequencies(m.width // m.num_heads)
  if m.rope_layout not in ("official", "consistent"):
    raise ValueError(f"model.rope_layout={m.rope_layout!r}: expected 'official' or 'consistent'")
  if m.attention not in attn_lib.IMPLEMENTATIONS:
    raise ValueError(f"model.attention={m.attention!r}: expected one of {attn_lib.IMPLEMENTATIONS}")
  if defaults.field(m, "mlp_kernel") not in MLP_KERNELS:
    raise ValueError(f"model.mlp_kernel={m.mlp_kernel!r}: expected one of {MLP_KERNELS}")
  if m.remat not in REMAT_POLICIES:
    raise ValueError(f"model.remat={m.remat!r}: expected one of {tuple(REMAT_POLICIES)}")
  if m.dtype not in precision.COMPUTE_DTYPES:
    raise ValueError(f"model.dtype={m.dtype!r}: expected one of {precision.COMPUTE_DTYPES}")
  reduce_dtype = defaults.field(m, "grad_reduce_dtype")
  if reduce_dtype not in precision.REDUCE_DTYPES:
    raise ValueError(f"model.grad_reduce_dtype={reduce_dtype!r}: expected one of {precision.REDUCE_DTYPES}")
