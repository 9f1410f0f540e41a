"""Encoder forward+backward time vs token budget (sparse codec tokens vs the dense grid), memory, and
JAX vs PyTorch eager on CPU.

python benchmarks/bench_encoder.py [--json PATH] [--quick] [--gpu] [--torch_compare] [--reps N]

--gpu: only large in bf16 with cuDNN attention on one GPU (8 clips x 8 frames x 256 tokens a step):
tokens/s and MFU against --peak_tflops (JSON gpu_large_tokens_per_s, gpu_large_step_s, gpu_large_mfu).

Default: tiny and base budget tables, the dense 16-frame memory run, then the PyTorch comparison.
--quick: the tiny table only (smoke run, no PyTorch). --torch_compare: only the PyTorch comparison.

PyTorch comparison: base, one 16-frame 224x224 clip (4,096-token grid) at budgets 12.5% (512 tokens),
25% and 6.25%, fp32, batch 1, loss = mean(pooled^2). The same tokens go through the JAX encoder
(jit, `model.attention=auto` -> xla on CPU) and `ovenc_jax.interop.torch_model.OVEncoder` in eager mode
(random weights; timing only), forward alone (torch under no_grad) and forward+backward (all
parameter gradients). Both use as many threads as the process may run on: XLA's intra-op pool
takes one per CPU of the affinity mask, torch gets torch.set_num_threads(that count). Timings are
interleaved (JAX, torch, JAX, torch...) and the minimum of --reps rounds is kept, so background
load hits both alike. JSON: cpu_fwd_s_<b>, cpu_fwd_bwd_s_<b> (JAX), torch_cpu_fwd_s_<b>,
torch_cpu_fwd_bwd_s_<b>, cpu_fwd_ratio_<b>, cpu_fwd_bwd_ratio_<b> (JAX / torch) for b in 12_5, 25,
6_25. The target: cpu_fwd_bwd_ratio_12_5 <= 1.2.
"""
import argparse
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from ovenc_jax.model import defaults as model_defaults
from ovenc_jax.model import encoder as model_lib

BUDGETS = (1.0, 0.25, 0.125, 0.0625)
GRID = 16  # 224 / 14


def clip_tokens(frames: int, budget: float, patch: int = 14, seed: int = 0):
  """A clip's kept tokens: a random budget-sized subset of the T x 16 x 16 grid, sorted (t, h, w)."""
  total = frames * GRID * GRID
  k = int(round(budget * total))
  rng = np.random.default_rng(seed)
  cells = np.sort(rng.choice(total, size=k, replace=False))
  t, hw = np.divmod(cells, GRID * GRID)
  h, w = np.divmod(hw, GRID)
  patches = rng.integers(0, 256, size=(1, k, patch * patch * 3), dtype=np.uint8)
  positions = np.stack([t, h, w], -1)[None].astype(np.int32)
  return jnp.asarray(patches), jnp.asarray(positions), jnp.ones((1, k), jnp.int32)


def make_step(cfg):
  enc = model_lib.encoder_from_config(cfg)

  def loss(params, patches, positions, segments):
    out = enc.apply(params, patches, positions, segments)
    return jnp.mean(out["pooled"].astype(jnp.float32) ** 2)

  return enc, jax.jit(jax.value_and_grad(loss))


def time_step(cfg, frames, budget, reps):
  enc, step = make_step(cfg)
  inputs = clip_tokens(frames, budget)
  params = jax.jit(enc.init)(jax.random.key(0), *inputs)
  compiled = step.lower(params, *inputs).compile()
  mem = compiled.memory_analysis()
  temp_gb = (mem.temp_size_in_bytes if mem is not None else float("nan")) / 2**30
  jax.block_until_ready(compiled(params, *inputs))  # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, *inputs))
    times.append(time.perf_counter() - t0)
  return min(times), int(inputs[0].shape[1]), temp_gb


def budget_table(variant, frames, reps, results, key):
  cfg = model_defaults.model_config(variant)
  rows = []
  for b in BUDGETS:
    sec, tokens, temp_gb = time_step(cfg, frames, b, reps if b < 1 else max(1, reps - 1))
    rows.append((b, tokens, sec, temp_gb))
  dense = rows[0][2]
  print(f"\n{variant}, {frames} frames at 224 (dense {rows[0][1]} tokens), fp32 fwd+bwd, CPU x{os.cpu_count()}")
  print(f"{'budget':>8} {'tokens':>7} {'step s':>9} {'speedup':>8} {'flop limit':>10} {'XLA temp GiB':>12}")
  for b, tokens, sec, temp_gb in rows:
    print(f"{b * 100:7.2f}% {tokens:7d} {sec:9.3f} {dense / sec:7.2f}x {flop_ratio(cfg, rows[0][1], tokens):9.2f}x {temp_gb:12.2f}")
    results[f"{key}_step_s_{str(b * 100).rstrip('0').rstrip('.').replace('.', '_')}"] = sec
  for b, _, sec, _ in rows[1:]:
    results[f"{key}_speedup_{str(b * 100).rstrip('0').rstrip('.').replace('.', '_')}"] = dense / sec
  return rows


def flop_ratio(cfg, dense_tokens, tokens):
  """Forward FLOPs dense / sparse: linear layers scale with N, attention with N^2."""
  d, m, layers = cfg.width, cfg.mlp_dim, cfg.depth

  def flops(n):
    return layers * (n * (8 * d * d + 4 * d * m) + 4 * n * n * d)

  return flops(dense_tokens) / flops(tokens)


def dense_memory_run(reps, results):
  """The dense 16-frame base clip (4,096 tokens) with chunked attention and per-block remat."""
  cfg = model_defaults.model_config("base")
  cfg.update(dict(attention="chunked", attn_chunk_size=512, remat="block"))
  sec, tokens, temp_gb = time_step(cfg, 16, 1.0, reps)
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  plain = model_defaults.model_config("base")
  plain.update(dict(remat="block"))
  _, step = make_step(plain)
  inputs = clip_tokens(16, 1.0)
  abstract = jax.eval_shape(model_lib.encoder_from_config(plain).init, jax.random.key(0), *inputs)
  mem = step.lower(abstract, *inputs).compile().memory_analysis()
  plain_gb = mem.temp_size_in_bytes / 2**30 if mem is not None else float("nan")
  print(f"\nbase, 16 frames dense ({tokens} tokens), fp32 fwd+bwd, attention=chunked(512) remat=block")
  print(f"{'path':>28} {'step s':>9} {'XLA temp GiB':>13} {'process peak RSS GiB':>21}")
  print(f"{'chunked + remat (trains)':>28} {sec:9.2f} {temp_gb:13.2f} {rss_gb:21.2f}")
  print(f"{'plain xla + remat (compile)':>28} {'-':>9} {plain_gb:13.2f} {'-':>21}")
  results.update(base16_dense_step_s=sec, base16_dense_temp_gib=temp_gb, base16_peak_rss_gib=rss_gb,
                 base16_plain_attention_temp_gib=plain_gb)


COMPARE_BUDGETS = (0.125, 0.25, 0.0625)


def _budget_key(b):
  return str(b * 100).rstrip("0").rstrip(".").replace(".", "_")


def _min_time(fn, reps):
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def torch_compare(reps, results, frames=16, budgets=COMPARE_BUDGETS):
  """JAX vs PyTorch eager (ovenc_jax.interop.torch_model), base fp32 on CPU: forward and forward+backward."""
  import torch  # noqa: PLC0415  (only this section needs it)

  from ovenc_jax.interop import torch_layout  # noqa: PLC0415
  from ovenc_jax.interop import torch_model  # noqa: PLC0415

  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  torch.set_num_threads(threads)
  cfg = model_defaults.model_config("base")
  enc = model_lib.encoder_from_config(cfg, platform="cpu")
  torch.manual_seed(0)
  tmodel = torch_model.OVEncoder(torch_layout.Arch(cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim,
                                                   cfg.patch_size), rope_layout=cfg.rope_layout)

  def loss(params, patches, positions, segments):
    return jnp.mean(enc.apply(params, patches, positions, segments)["pooled"].astype(jnp.float32) ** 2)

  rows = []
  for b in budgets:
    inputs = clip_tokens(frames, b)
    params = jax.jit(enc.init)(jax.random.key(0), *inputs)
    fwd = jax.jit(loss).lower(params, *inputs).compile()
    fwd_bwd = jax.jit(jax.value_and_grad(loss)).lower(params, *inputs).compile()
    tp, tpos, tseg = (torch.as_tensor(np.array(a)) for a in inputs)
    tpos, tseg = tpos.long(), tseg.long()

    def jax_fwd():
      jax.block_until_ready(fwd(params, *inputs))

    def jax_fwd_bwd():
      jax.block_until_ready(fwd_bwd(params, *inputs))

    def torch_fwd():
      with torch.no_grad():
        (tmodel(tp, tpos, tseg)["pooled"] ** 2).mean()

    def torch_fwd_bwd():
      tmodel.zero_grad(set_to_none=True)
      (tmodel(tp, tpos, tseg)["pooled"] ** 2).mean().backward()

    fns = dict(jf=jax_fwd, tf=torch_fwd, jb=jax_fwd_bwd, tb=torch_fwd_bwd)
    for fn in fns.values():  # warm-up (torch allocator, XLA thread pool)
      fn()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):  # interleaved: background load hits both frameworks alike
      for k, fn in fns.items():
        best[k] = min(best[k], _min_time(fn, 1))
    rows.append((b, int(inputs[0].shape[1]), best))
    key = _budget_key(b)
    results.update({f"cpu_fwd_s_{key}": best["jf"], f"cpu_fwd_bwd_s_{key}": best["jb"],
                    f"torch_cpu_fwd_s_{key}": best["tf"], f"torch_cpu_fwd_bwd_s_{key}": best["tb"],
                    f"cpu_fwd_ratio_{key}": best["jf"] / best["tf"],
                    f"cpu_fwd_bwd_ratio_{key}": best["jb"] / best["tb"]})
  print(f"\nbase, {frames} frames at 224, fp32, batch 1: JAX (jit) vs PyTorch {torch.__version__} eager, "
        f"CPU, {threads} threads each")
  print(f"{'budget':>8} {'tokens':>7} {'JAX fwd s':>10} {'torch fwd s':>12} {'ratio':>6} "
        f"{'JAX fwd+bwd s':>14} {'torch fwd+bwd s':>16} {'ratio':>6}")
  for b, tokens, t in rows:
    print(f"{b * 100:7.2f}% {tokens:7d} {t['jf']:10.3f} {t['tf']:12.3f} {t['jf'] / t['tf']:6.2f} "
          f"{t['jb']:14.3f} {t['tb']:16.3f} {t['jb'] / t['tb']:6.2f}")
  print(f"target: JAX fwd+bwd within 1.2x of PyTorch at 12.5% -> {results['cpu_fwd_bwd_ratio_12_5']:.2f}x")
  return rows


def gpu_run(results):
  """`large` at 224 in bf16 on one GPU: tokens/s and MFU (peak from --peak_tflops)."""
  cfg = model_defaults.model_config("large")
  cfg.update(dict(dtype="bfloat16", attention="cudnn"))
  frames, batch = 8, 8
  enc, step = make_step(cfg)
  p, pos, seg = clip_tokens(frames, 1.0)
  p, pos, seg = (jnp.repeat(a, batch, 0) for a in (p, pos, seg))
  params = jax.jit(enc.init)(jax.random.key(0), p, pos, seg)
  jax.block_until_ready(step(params, p, pos, seg))
  t0 = time.perf_counter()
  for _ in range(10):
    out = step(params, p, pos, seg)
  jax.block_until_ready(out)
  sec = (time.perf_counter() - t0) / 10
  tokens = batch * p.shape[1]
  n = p.shape[1]
  # fwd FLOPs per layer: projections 8*N*D^2, MLP 4*N*D*M, attention 4*N^2*D; training = 3x fwd.
  flops = 3 * batch * cfg.depth * (n * (8 * cfg.width ** 2 + 4 * cfg.width * cfg.mlp_dim) + 4 * n * n * cfg.width)
  results.update(gpu_large_tokens_per_s=tokens / sec, gpu_large_step_s=sec, gpu_large_flops=flops)
  print(f"\nlarge bf16 on {jax.devices()[0].device_kind}: {tokens / sec:,.0f} tokens/s, {sec:.3f} s/step")
  return flops / sec


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--json", help="write the figures here")
  ap.add_argument("--quick", action="store_true", help="tiny only (smoke run)")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--gpu", action="store_true", help="only the large/bf16 run on the GPU")
  ap.add_argument("--peak_tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100 SXM)")
  ap.add_argument("--torch_compare", action="store_true",
                  help="only the JAX vs PyTorch CPU comparison (part of the default run)")
  ap.add_argument("--compare_reps", type=int, default=5, help="interleaved rounds of the PyTorch comparison")
  args = ap.parse_args()
  results = {}
  if args.gpu:  # on a GPU machine the CPU tables mean nothing: the GPU run alone
    achieved = gpu_run(results)
    results["gpu_large_mfu"] = achieved / (args.peak_tflops * 1e12)
    print(f"MFU {results['gpu_large_mfu'] * 100:.1f}% of {args.peak_tflops} TFLOP/s")
  elif not args.torch_compare:
    budget_table("tiny", 16, args.reps, results, "tiny16")
  if not args.quick and not args.torch_compare and not args.gpu:
    budget_table("base", 8, args.reps, results, "base8")
    results["speedup_25"] = results["base8_speedup_25"]
    results["speedup_6_25"] = results["base8_speedup_6_25"]
    print(f"\ntargets (base, 8 frames): >= 5x at 25% -> {results['speedup_25']:.2f}x; "
          f">= 18x at 6.25% -> {results['speedup_6_25']:.2f}x")
    dense_memory_run(max(1, args.reps - 2), results)
  if (not args.quick or args.torch_compare) and not args.gpu:
    torch_compare(args.compare_reps, results)
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, args.json)


if __name__ == "__main__":
  main()
