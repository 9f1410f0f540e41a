"""Train-step throughput (tiny, 8 host devices) with the input pipeline, the input pipeline alone, and the
trainer's loop with metrics fetched per log window (steps_per_s) vs every step (steps_per_s_before).

python benchmarks/bench_train.py [--json PATH] [--steps N] [--loop_steps N] [--variant tiny] [--rows 32]
    [--tokens_per_row 1024]
"""
import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from array_record.python import array_record_module  # noqa: E402

from configs import pretrain  # noqa: E402
from data_prep import records  # noqa: E402
from ovenc_jax import input_pipeline, train  # noqa: E402


def write_clip_shards(out_dir: str, n: int = 512, frames: int = 8, grid: int = 16, keep: float = 0.2,
                      num_shards: int = 4, seed: int = 0) -> str:
  """Clip-like records: ~keep of a frames x grid x grid token grid, random pixels, 3 labels each."""
  rng = np.random.default_rng(seed)
  os.makedirs(out_dir, exist_ok=True)
  total = frames * grid * grid
  for s in range(num_shards):
    w = array_record_module.ArrayRecordWriter(os.path.join(out_dir, records.shard_name(s, num_shards)),
                                              "group_size:1")
    for i in range(s, n, num_shards):
      k = int(rng.integers(int(0.5 * keep * total), int(1.5 * keep * total)))
      cells = np.sort(rng.choice(total, size=k, replace=False))
      t, hw = np.divmod(cells, grid * grid)
      h, ww = np.divmod(hw, grid)
      path = f"bench/clip_{i:05d}.mp4"
      w.write(records.encode_record(dict(
          patches=rng.integers(0, 256, size=(k, 14, 14, 3), dtype=np.uint8),
          positions=np.stack([t, h, ww], -1).astype(np.int32), grid=np.array([frames, grid, grid], np.int32),
          frame_types="I" + "P" * (frames - 1), source=path, sample_id=records.sample_id_for(path),
          labels=rng.integers(0, 1000, size=3).astype(np.int32), signal="mv+residual", class_label=-1)))
    w.close()
  return out_dir


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--json")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--loop_steps", type=int, default=20, help="timed steps of each Trainer.run()")
  ap.add_argument("--variant", default="tiny")
  ap.add_argument("--rows", type=int, default=32, help="global batch rows")
  ap.add_argument("--tokens_per_row", type=int, default=1024)
  args = ap.parse_args()
  tmp = tempfile.mkdtemp(prefix="bench_train_")
  data = write_clip_shards(os.path.join(tmp, "data"))
  cfg = pretrain.get_config(f"variant={args.variant},data={data}")
  cfg.input.update(global_batch_size=args.rows, tokens_per_row=args.tokens_per_row, max_segments=4, max_labels=3)
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
  # host once per log window, waiting one step behind, vs the old device_get after every step.
  # The two runs alternate twice so machine noise hits both alike; each keeps its faster run.
  c = trainer.config
  c.total_steps, c.log_every, c.ckpt_every, c.eval_every = args.loop_steps + 1, 10, 10**6, 0
  loop = {}
  for i, every_step in enumerate((True, False, True, False)):
    trainer.config.fetch_metrics_every_step = every_step
    trainer.workdir = os.path.join(tmp, f"loop{i}")
    rate = trainer.run()["steps_per_s"]
    loop[every_step] = max(loop.get(every_step, 0.0), rate)

  res = dict(steps_per_s=loop[False], steps_per_s_before=loop[True],
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
  if args.json:
    with open(args.json + ".tmp", "w") as f:
      json.dump(res, f, indent=1, sort_keys=True)
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
  main()
