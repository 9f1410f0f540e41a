"""Train-step throughput (tiny, 8 host devices) with the input pipeline, the input pipeline alone, and the
trainer's loop with metrics fetched per log window (steps_per_s) vs every step (steps_per_s_before), and
the bare jitted step on a device-resident batch.

Both modes write run_over_step (Trainer.run steps/s over the bare step's, same trainer; target >= 0.95),
mfu_step, mfu_run (the model's FLOPs, ovenc_jax.train.observability.model_flops, against the device's
bf16 peak from observability's table, or on host CPU devices its nominal CPU peak), tokens_per_s_per_device
(Trainer.run, the tokens the step computes: rows x tokens_per_row) and device (jax's device_kind).

python benchmarks/bench_train.py [--json PATH] [--steps N] [--loop_steps N] [--variant tiny] [--rows 32]
    [--tokens_per_row 1024]
python benchmarks/bench_train.py --gpu [--json PATH] [--variant base] [--loop_steps 50] [--peak_tflops 989]

--gpu: a real train on the visible GPUs with the `pod=h100x8` preset's per-GPU share (base:
64 rows a GPU, data parallel, bf16, cuDNN flash attention) on 16-frame clips at 12.5% (512 tokens, one
clip a row), 1M centers, 10 labels a clip, as bench_aot compiles it. It times Trainer.run over
--loop_steps steps (input pipeline, metrics and the final checkpoint save included; timed after the
compiling step, before the save), the compiled step alone on one device-resident batch, the input
pipeline alone, and a bf16 8192^3 matmul as the measured ceiling. MFU = the model's matmul FLOPs
(ovenc_jax.aot.compile.model_flops, no recompute) / step time / (GPUs x --peak_tflops). JSON: gpu_<variant>_
run_tokens_per_s, gpu_<variant>_run_mfu, gpu_<variant>_step_s, gpu_<variant>_step_tokens_per_s,
gpu_<variant>_step_mfu, gpu_input_tokens_per_s, gpu_matmul_tflops, gpu_<variant>_peak_gib_per_gpu, and
where Trainer.run's time went (gpu_<variant>_run_{median_step,dispatch,device_wait,checkpoint_manager,
metrics_fetch,final_save}_s). XLA's GPU cost analysis omits cuBLAS/cuDNN calls, so the XLA-FLOP ratio
(gpu_<variant>_model_over_xla_flops) is written only off GPU.
"""
import argparse
import collections
import math
import os
import tempfile
import time

import numpy as np
from array_record.python import array_record_module

from ovenc_format import atomic_io
from ovenc_format import records
from ovenc_jax.aot import compile as aot
from ovenc_jax.configs import common
from ovenc_jax.configs import pretrain
from ovenc_jax.train import observability


def write_clip_shards(out_dir: str, n: int = 512, frames: int = 8, grid: int = 16, keep: float = 0.2,
                      num_shards: int = 4, seed: int = 0, exact: bool = False, num_labels: int = 3,
                      num_classes: int = 1000) -> str:
  """Clip-like records: ~keep (exactly keep with `exact`) of a frames x grid x grid token grid, random
  pixels, num_labels labels each."""
  rng = np.random.default_rng(seed)
  os.makedirs(out_dir, exist_ok=True)
  total = frames * grid * grid
  for s in range(num_shards):
    w = array_record_module.ArrayRecordWriter(os.path.join(out_dir, records.shard_name(s, num_shards)),
                                              "group_size:1")
    for i in range(s, n, num_shards):
      k = (int(round(keep * total)) if exact
           else int(rng.integers(int(0.5 * keep * total), int(1.5 * keep * total))))
      cells = np.sort(rng.choice(total, size=k, replace=False))
      t, hw = np.divmod(cells, grid * grid)
      h, ww = np.divmod(hw, grid)
      path = f"bench/clip_{i:05d}.mp4"
      w.write(records.encode_record(dict(
          patches=rng.integers(0, 256, size=(k, 14, 14, 3), dtype=np.uint8),
          positions=np.stack([t, h, ww], -1).astype(np.int32), grid=np.array([frames, grid, grid], np.int32),
          frame_types="I" + "P" * (frames - 1), source=path, sample_id=records.sample_id_for(path),
          labels=rng.choice(num_classes, size=num_labels, replace=False).astype(np.int32),
          signal="mv+residual", class_label=-1)))
    w.close()
  # The completion marker the input pipeline requires (data_prep.codec_patchify writes it last).
  atomic_io.save_json(os.path.join(out_dir, "manifest.json"),
                      dict(shards=[records.shard_name(s, num_shards) for s in range(num_shards)], records=n))
  return out_dir


def _bf16_matmul_tflops(n: int = 8192, reps: int = 10) -> float:
  """The measured ceiling: a bf16 n^3 matmul on the first device, TFLOP/s."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  jax.block_until_ready(out)
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _peak(args, device) -> float:
  """--peak_tflops, else the device's bf16 peak from the trainer's table; host CPU devices take its
  nominal CPU peak, so that the MFU fields exist on every machine."""
  if args.peak_tflops:
    return args.peak_tflops * 1e12
  peak = observability.peak_flops(device.device_kind)
  if peak is None and device.platform == "cpu":
    return observability.CPU_NOMINAL_PEAK_FLOPS
  if peak is None:
    raise SystemExit(f"no bf16 peak is known for {device.device_kind!r}; give --peak_tflops")
  return peak


def gpu_train(args) -> dict:
  """Trainer.run and the bare step on the visible GPUs, the h100x8 preset's share a GPU (module doc)."""
  import jax
  from ovenc_jax.input import global_arrays
  from ovenc_jax.input import pipeline as input_pipeline
  from ovenc_jax.train import trainer as train
  n_gpu = jax.device_count()
  preset = common.POD_PRESETS["h100x8"]
  if args.variant not in preset["variants"]:
    raise SystemExit(f"--variant={args.variant!r}: --gpu runs the pod=h100x8 preset, which has "
                     f"{sorted(preset['variants'])}")
  rows = args.rows or preset["variants"][args.variant][1] // preset["devices"] * n_gpu
  tmp = tempfile.mkdtemp(prefix="bench_train_gpu_")
  num_classes, labels = args.num_classes, 10
  # 16 frames x 16 x 16 at 12.5% = 512 tokens a clip; 4 steps' worth of distinct clips, repeated.
  data = write_clip_shards(os.path.join(tmp, "data"), n=4 * rows, frames=16, keep=0.125, exact=True,
                           num_labels=labels, num_classes=num_classes, num_shards=8)
  cfg = pretrain.get_config(f"variant={args.variant},data={data},pod=h100x8")
  cfg.mesh.update(data=-1, fsdp=1, tensor=1)  # the preset's base is data parallel; here over n_gpu
  cfg.input.update(global_batch_size=rows, tokens_per_row=512, max_segments=1, max_labels=labels,
                   worker_count=args.input_workers)
  cfg.loss.num_classes = num_classes
  if args.attention:
    cfg.model.attention = args.attention
  cfg.total_steps, cfg.optim.warmup_steps = args.loop_steps + 1, min(10, args.loop_steps)
  cfg.log_every, cfg.ckpt_every, cfg.eval_every = 10, 10 ** 6, 0
  trainer = train.Trainer(cfg, os.path.join(tmp, "work"))
  mesh = dict(trainer.mesh.shape)
  flops = aot.model_flops(cfg, math.prod(mesh[a] for a in trainer.class_axes),
                          trainer.abstract_state["params"]["centers"].shape[0], mesh["tensor"])["total"]
  tokens_per_step = rows * 512
  kind = jax.devices()[0].device_kind
  peak_one = _peak(args, jax.devices()[0])
  peak = peak_one * n_gpu
  res = {}

  it = input_pipeline.make_train_iterator(cfg.input)
  host_batch = next(it)
  # Every worker must be up before timing: with many workers, 3 batches of warm-up timed their start-up.
  for _ in range(3 + 4 * args.input_workers):
    next(it)
  t0, n_in = time.perf_counter(), 100
  for _ in range(n_in):
    next(it)
  res["gpu_input_tokens_per_s"] = n_in * tokens_per_step / (time.perf_counter() - t0)
  del it

  # Where Trainer.run's time goes: dispatch (train_step: host->device copy, stop flag, launch), waits
  # on the device (block_until_ready), the checkpoint manager's per-step call and metric fetches; the
  # rest is next(data_iter) and the loop itself. Step start times give the median step interval.
  # Counted from step 2 on (step 1 compiles), as summary["steps_per_s"] is.
  calls, starts = collections.defaultdict(list), []

  def timed(owner, name, key, mark=False):
    fn = getattr(owner, name)

    def wrapper(*a, **k):
      t = time.perf_counter()
      if mark:
        starts.append(t)
      try:
        return fn(*a, **k)
      finally:
        if len(starts) >= 2:
          calls[key].append(time.perf_counter() - t)
    setattr(owner, name, wrapper)
    return fn

  timed(trainer, "train_step", "dispatch", mark=True)
  timed(trainer, "_save", "checkpoint_manager")
  timed(trainer, "_fetch", "metrics_fetch")
  block = timed(train.jax, "block_until_ready", "device_wait")
  t0 = time.perf_counter()
  try:
    summary = trainer.run()
  finally:
    train.jax.block_until_ready = block
  wall = time.perf_counter() - t0
  # Steps 2..N (step 1 compiles), as summary["steps_per_s"] times them.
  loop_s = starts[-1] - starts[1] if len(starts) > 2 else float("nan")
  intervals = np.diff(starts[1:])
  final_save_s = calls["checkpoint_manager"].pop() if calls["checkpoint_manager"] else 0.0  # after the timing
  breakdown = {k: sum(calls[k]) for k in ("dispatch", "device_wait", "checkpoint_manager", "metrics_fetch")}
  run_rate = summary["steps_per_s"]
  pre = f"gpu_{args.variant}_"
  res.update({pre + "run_median_step_s": float(np.median(intervals)) if len(intervals) else float("nan"),
              pre + "run_max_step_s": float(intervals.max()) if len(intervals) else float("nan")})
  res.update({f"{pre}run_{k}_s": v for k, v in breakdown.items()})
  res[pre + "run_final_save_s"] = final_save_s
  res.update({pre + "run_tokens_per_s": run_rate * tokens_per_step, pre + "run_mfu": run_rate * flops / peak,
              pre + "run_wall_s": wall, pre + "final_loss": float(summary["final_loss"]),
              pre + "first_window_loss": float(summary["first_window_mean_loss"])})

  # The compiled step alone on one batch already on the devices: the ceiling the loop could reach.
  state = trainer.state
  batch = global_arrays.global_batch(host_batch, trainer.mesh, trainer.batch_axes)
  with jax.set_mesh(trainer.mesh):
    for _ in range(3):
      state, m = trainer._step_fn(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, m = trainer._step_fn(state, batch)
    jax.block_until_ready(m)
  step_s = (time.perf_counter() - t0) / args.steps
  res.update({pre + "step_s": step_s, pre + "step_tokens_per_s": tokens_per_step / step_s,
              pre + "step_mfu": flops / step_s / peak, pre + "model_tflop_per_step": flops / 1e12})
  # XLA's GPU cost analysis leaves out library calls (cuBLAS matmuls, cuDNN attention): no ratio there.
  xla_flops = trainer.step_flops(host_batch) * n_gpu if jax.default_backend() != "gpu" else None
  if xla_flops:
    res[pre + "model_over_xla_flops"] = flops / xla_flops
  # (skipped on CPU, where --gpu only runs as a smoke test of this script)
  res["gpu_matmul_tflops"] = _bf16_matmul_tflops() if jax.default_backend() == "gpu" else 0.0
  mem = jax.devices()[0].memory_stats() or {}
  res[pre + "peak_gib_per_gpu"] = mem.get("peak_bytes_in_use", 0) / 2 ** 30

  res.update(device=kind, run_over_step=run_rate * step_s, mfu_step=res[pre + "step_mfu"],
             mfu_run=res[pre + "run_mfu"], tokens_per_s_per_device=res[pre + "run_tokens_per_s"] / n_gpu)
  print(f"\n{args.variant} on {n_gpu} x {kind}: {rows} rows x 512 tokens a step ({tokens_per_step:,} tokens), "
        f"{num_classes:,} centers, {cfg.model.dtype}, attention={cfg.model.attention}, remat={cfg.model.remat}")
  print(f"model FLOPs a step {flops / 1e12:.2f} T"
        + (f" (XLA counts {xla_flops / 1e12:.2f} T)" if xla_flops else "") + "; "
        f"MFU against {peak_one / 1e12:.0f} TFLOP/s a GPU (bf16 dense, datasheet); "
        f"measured bf16 matmul {res['gpu_matmul_tflops']:.0f} TFLOP/s")
  print(f"{'':34} {'steps/s':>8} {'tokens/s':>12} {'MFU':>6}")
  print(f"{'Trainer.run, ' + str(args.loop_steps) + ' steps':34} {run_rate:8.2f} "
        f"{res[pre + 'run_tokens_per_s']:12,.0f} {res[pre + 'run_mfu'] * 100:5.1f}%")
  print(f"{'step alone (batch on device)':34} {1 / step_s:8.2f} {res[pre + 'step_tokens_per_s']:12,.0f} "
        f"{res[pre + 'step_mfu'] * 100:5.1f}%")
  print(f"{'input pipeline alone':34} {res['gpu_input_tokens_per_s'] / tokens_per_step:8.2f} "
        f"{res['gpu_input_tokens_per_s']:12,.0f}")
  print(f"Trainer.run step interval: median {res[pre + 'run_median_step_s'] * 1e3:.1f} ms, max "
        f"{res[pre + 'run_max_step_s'] * 1e3:.1f} ms; steps 2-{len(starts)} took {loop_s:.2f} s, in "
        + ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items())
        + f"; then the final checkpoint save {final_save_s:.1f} s")
  print(f"loss: first window {res[pre + 'first_window_loss']:.3f}, last step {res[pre + 'final_loss']:.3f}; "
        f"peak memory {res[pre + 'peak_gib_per_gpu']:.1f} GiB a GPU; Trainer.run wall {wall:.1f} s "
        f"(compile and checkpoint save included)")
  return res


def cpu_run(args) -> dict:
  """Train step + input, input alone and the Trainer.run loop on 8 host devices (module doc)."""
  import jax
  from ovenc_jax.input import pipeline as input_pipeline
  from ovenc_jax.train import trainer as train
  tmp = tempfile.mkdtemp(prefix="bench_train_")
  data = write_clip_shards(os.path.join(tmp, "data"))
  cfg = pretrain.get_config(f"variant={args.variant},data={data}")
  cfg.input.update(global_batch_size=args.rows or 32, tokens_per_row=args.tokens_per_row, max_segments=4,
                   max_labels=3)
  cfg.loss.num_classes = 1000
  cfg.total_steps, cfg.optim.warmup_steps = 10_000, 10
  trainer = train.Trainer(cfg, os.path.join(tmp, "work"))
  state = trainer.init_state(0)

  # Input pipeline alone: batches/s of host batches, as the trainer consumes them.
  it = input_pipeline.make_train_iterator(cfg.input)
  for _ in range(3):
    next(it)
  t0, tokens, samples = time.perf_counter(), 0, 0
  n_in = 3 * args.steps
  for _ in range(n_in):
    b = next(it)
    tokens += int((b["segment_ids"] > 0).sum())
    samples += int((b["sample_id"] >= 0).sum())
  dt_in = time.perf_counter() - t0
  input_rate = n_in / dt_in

  # Full train step fed by the same pipeline, fetching each step's metrics (the pre-window path).
  it = input_pipeline.make_train_iterator(cfg.input)
  for _ in range(3):
    state, m = trainer.train_step(state, next(it))
    jax.block_until_ready(m)
  t0, s_tokens, s_samples = time.perf_counter(), 0, 0
  for _ in range(args.steps):
    state, m = trainer.train_step(state, next(it))
    m = jax.device_get(m)
    s_tokens += int(m["tokens"])
    s_samples += int(m["samples"])
  dt_step = time.perf_counter() - t0
  step_rate = args.steps / dt_step

  # The trainer's own loop (Trainer.run), timed after its first (compiling) step: metrics reach the
  # host once per log window, waiting one step behind, vs a device_get after every step.
  # The two runs alternate twice so machine noise hits both alike; each keeps its faster run.
  c = trainer.config
  c.total_steps, c.log_every, c.ckpt_every, c.eval_every = args.loop_steps + 1, 10, 10**6, 0
  loop = {}
  for i, every_step in enumerate((True, False, True, False)):
    trainer.config.fetch_metrics_every_step = every_step
    trainer.workdir = os.path.join(tmp, f"loop{i}")
    rate = trainer.run()["steps_per_s"]
    loop[every_step] = max(loop.get(every_step, 0.0), rate)

  # The bare jitted step on one device-resident batch, same trainer and state: the loop's ceiling.
  from ovenc_jax.input import global_arrays
  batch = global_arrays.global_batch(b, trainer.mesh, trainer.batch_axes)
  state = trainer.state
  with jax.set_mesh(trainer.mesh):
    for _ in range(2):
      state, m = trainer._step_fn(state, batch)
    jax.block_until_ready(m)
    bare = []
    for _ in range(2):  # the faster of two timings, as for the loop
      t0 = time.perf_counter()
      for _ in range(args.loop_steps):
        state, m = trainer._step_fn(state, batch)
      jax.block_until_ready(m)
      bare.append(args.loop_steps / (time.perf_counter() - t0))
  bare_rate = max(bare)
  n_dev = jax.device_count()
  flops = observability.trainer_step_flops(trainer)  # per device
  peak = _peak(args, jax.devices()[0])
  padded_tokens = cfg.input.global_batch_size * cfg.input.tokens_per_row
  res = dict(device=jax.devices()[0].device_kind, run_over_step=loop[False] / bare_rate,
             bare_step_per_s=bare_rate, mfu_step=flops * bare_rate / peak, mfu_run=flops * loop[False] / peak,
             tokens_per_s_per_device=loop[False] * padded_tokens / n_dev, peak_tflops=peak / 1e12)
  res.update(steps_per_s=loop[False], steps_per_s_before=loop[True],
             step_per_s=step_rate, step_samples_per_s=s_samples / dt_step, step_tokens_per_s=s_tokens / dt_step,
             input_batches_per_s=input_rate, input_samples_per_s=samples / dt_in,
             input_tokens_per_s=tokens / dt_in, input_over_step=input_rate / step_rate)
  print(f"\n{args.variant}, {jax.device_count()} host devices, global batch {cfg.input.global_batch_size} rows x "
        f"{cfg.input.tokens_per_row} tokens (packed, <= {cfg.input.max_segments} clips/row), "
        f"{cfg.loss.num_classes} centers")
  print(f"{'':24} {'batches/s':>10} {'samples/s':>10} {'tokens/s':>12}")
  print(f"{'train step + input':24} {step_rate:10.2f} {res['step_samples_per_s']:10.1f} {res['step_tokens_per_s']:12,.0f}")
  print(f"{'input pipeline alone':24} {input_rate:10.2f} {res['input_samples_per_s']:10.1f} {res['input_tokens_per_s']:12,.0f}")
  print(f"input_over_step = {res['input_over_step']:.2f} (target >= 3)")
  print(f"\nTrainer.run loop, {args.loop_steps} steps, log_every {c.log_every}: steps/s")
  print(f"{'metrics every step (before)':30} {'per log window (after)':>24} {'ratio':>7}")
  print(f"{res['steps_per_s_before']:30.2f} {res['steps_per_s']:24.2f} "
        f"{res['steps_per_s'] / res['steps_per_s_before']:6.2f}x")
  print(f"\n{'':30} {'steps/s':>8} {'tokens/s/device':>16} {'MFU':>7}   (MFU against a nominal "
        f"{peak / 1e12:.2f} TFLOP/s a device; tokens: rows x tokens_per_row)")
  print(f"{'Trainer.run (per log window)':30} {loop[False]:8.2f} {res['tokens_per_s_per_device']:16,.0f} "
        f"{100 * res['mfu_run']:6.2f}%")
  print(f"{'bare jitted step':30} {bare_rate:8.2f} {bare_rate * padded_tokens / n_dev:16,.0f} "
        f"{100 * res['mfu_step']:6.2f}%")
  print(f"run_over_step = {res['run_over_step']:.3f} (target >= 0.95)")
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--json")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--loop_steps", type=int, default=20, help="timed steps of each Trainer.run()")
  ap.add_argument("--variant", default=None, help="default tiny; --gpu: base")
  ap.add_argument("--rows", type=int, default=0, help="global batch rows (default 32; --gpu: the preset's)")
  ap.add_argument("--tokens_per_row", type=int, default=1024)
  ap.add_argument("--gpu", action="store_true", help="the GPU train run (module doc) instead")
  ap.add_argument("--peak_tflops", type=float, default=0.0,
                  help="bf16 dense peak a device (default: ovenc_jax.train.observability's table; on CPU its "
                       "nominal CPU peak)")
  ap.add_argument("--input_workers", type=int, default=0, help="--gpu: input.worker_count")
  ap.add_argument("--attention", default="", help="--gpu: override the preset's model.attention")
  ap.add_argument("--num_classes", type=int, default=1_000_000, help="--gpu: centers")
  args = ap.parse_args()
  args.variant = args.variant or ("base" if args.gpu else "tiny")
  # Before jax is imported (by the runs): the CPU runs use 8 host devices.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  res = gpu_train(args) if args.gpu else cpu_run(args)
  if args.json:
    atomic_io.save_json(args.json, res)


if __name__ == "__main__":
  main()
