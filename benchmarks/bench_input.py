"""Input pipeline alone: samples/s and tokens/s on generated clip-like shards (~400 tokens of 14x14x3 uint8)."""
import argparse
import json
import os
import tempfile
import time

import numpy as np
from array_record.python import array_record_module

from ovenc_format import atomic_io
from ovenc_format import records
from ovenc_jax.input import defaults

PATCH = 14
GRID = (8, 16, 16)  # 8 frames of a 224x224 clip in 14-pixel patches


def write_clip_shards(out_dir: str, num_records: int, num_shards: int, mean_tokens: int, seed: int) -> int:
  """Writes clip-like records (token counts uniform in mean +- 25 %); returns the total token count."""
  rng = np.random.default_rng(seed)
  os.makedirs(out_dir, exist_ok=True)
  total = 0
  positions_all = np.stack(np.unravel_index(np.arange(np.prod(GRID)), GRID), -1).astype(np.int32)
  for s in range(num_shards):
    final = os.path.join(out_dir, records.shard_name(s, num_shards))
    tmp = final + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for i in range(s, num_records, num_shards):
      k = int(rng.integers(mean_tokens * 3 // 4, mean_tokens * 5 // 4 + 1))
      keep = np.sort(rng.choice(len(positions_all), k, replace=False))
      path = f"bench/{i:06d}.mp4"
      writer.write(records.encode_record(dict(
          patches=rng.integers(0, 256, (k, PATCH, PATCH, 3), dtype=np.uint8),
          positions=positions_all[keep], grid=np.array(GRID, np.int32), frame_types="IPPPPPPP",
          source=path, sample_id=records.sample_id_for(path),
          labels=rng.integers(0, 100_000, 8).astype(np.int32), signal="mv+residual",
          class_label=-1)))
      total += k
    writer.close()
    os.replace(tmp, final)  # atomic: a shard is either complete or absent
  # The completion marker the input pipeline requires (data_prep.codec_patchify writes it last).
  atomic_io.save_json(os.path.join(out_dir, "manifest.json"),
                      dict(shards=[records.shard_name(s, num_shards) for s in range(num_shards)],
                           records=num_records))
  return total


def decode_only_rate(data_dir: str, seconds: float) -> tuple[float, float]:
  """Single-thread read + decode_record loop: the per-core cost floor of any reader."""
  samples = tokens = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    for rec in records.read_all(data_dir):
      samples += 1
      tokens += len(rec["positions"])
      if time.perf_counter() - t0 >= seconds:
        break
  dt = time.perf_counter() - t0
  return samples / dt, tokens / dt


def pipeline_rate(cfg, seconds: float, read_threads: int) -> dict[str, float]:
  from ovenc_jax.input import pipeline as ip
  ds = ip.make_train_dataset(cfg, process_index=0, process_count=1, read_threads=read_threads)
  it = iter(ds)
  next(it)  # start-up (threads, workers, first packing group) is not steady state
  samples = tokens = slots = batches = 0
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    samples += int((b["sample_id"] >= 0).sum())
    tokens += int((b["segment_ids"] > 0).sum())
    slots += b["segment_ids"].size
    batches += 1
  dt = time.perf_counter() - t0
  return dict(samples_per_s=samples / dt, tokens_per_s=tokens / dt, fill=tokens / slots,
              batches=batches)


def main():
  # Before jax is imported (by the pipeline): the input needs no accelerator.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from ovenc_jax.input import pipeline as ip
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--records", type=int, default=512)
  parser.add_argument("--shards", type=int, default=4)
  parser.add_argument("--mean-tokens", type=int, default=400)
  parser.add_argument("--batch", type=int, default=64, help="rows per batch (one process)")
  parser.add_argument("--tokens-per-row", type=int, default=1024)
  parser.add_argument("--max-segments", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=8.0, help="measured time per configuration")
  parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
  parser.add_argument("--read-threads", type=int, nargs="*", default=[ip.DEFAULT_READ_THREADS])
  parser.add_argument("--data", default="", help="existing shard dir to reuse (else a temp dir)")
  parser.add_argument("--json", default="", help="write the figures here")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    data = args.data or os.path.join(tmp, "clips")
    if not os.path.isdir(data):
      t0 = time.perf_counter()
      total = write_clip_shards(data, args.records, args.shards, args.mean_tokens, seed=0)
      print(f"wrote {args.records} records, {total / args.records:.0f} tokens mean, in "
            f"{time.perf_counter() - t0:.1f} s to {data}")

    dec_samples, dec_tokens = decode_only_rate(data, args.seconds / 2)
    rows = [("decode_record loop, 1 thread", dict(samples_per_s=dec_samples, tokens_per_s=dec_tokens,
                                                  fill=float("nan")))]
    figures = {"decode_only_samples_per_s": dec_samples, "decode_only_tokens_per_s": dec_tokens}
    for pack in (True, False):
      for workers in args.workers:
        for threads in args.read_threads:
          cfg = defaults.default_input_config()
          cfg.update(sources=[{"path": data, "weight": 1.0}], global_batch_size=args.batch,
                     tokens_per_row=args.tokens_per_row, max_segments=args.max_segments if pack else 1,
                     pack=pack, hflip=True, worker_count=workers, patch_size=PATCH)
          r = pipeline_rate(cfg, args.seconds, threads)
          name = f"{'pack' if pack else 'pad'}_w{workers}_t{threads}"
          rows.append((f"{'pack' if pack else 'pad '} workers={workers} threads={threads}", r))
          figures.update({f"{name}_{k}": float(v) for k, v in r.items()})

  print(f"\ninput pipeline alone: N={args.tokens_per_row}, S={args.max_segments} (pack), "
        f"{args.batch} rows/batch, hflip on, {os.cpu_count()} CPU cores")
  print(f"{'configuration':<36}{'samples/s':>11}{'tokens/s':>12}{'fill':>7}{'x decode':>10}")
  for name, r in rows:
    print(f"{name:<36}{r['samples_per_s']:>11.0f}{r['tokens_per_s']:>12.0f}{r['fill']:>7.2f}"
          f"{r['samples_per_s'] / dec_samples:>10.2f}")
  default = f"pack_w0_t{args.read_threads[0]}"
  if f"{default}_samples_per_s" in figures:
    figures["input_samples_per_s"] = figures[f"{default}_samples_per_s"]
    figures["input_tokens_per_s"] = figures[f"{default}_tokens_per_s"]
  if args.json:
    tmp_json = args.json + ".tmp"
    with open(tmp_json, "w") as f:
      json.dump(figures, f, indent=1, sort_keys=True)
    os.replace(tmp_json, args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
