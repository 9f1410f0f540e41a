"""Codec patchify throughput against bare PyAV decode, and the Beam job's speed, memory and shards."""
# On one set of clips: videos/s, frames/s and c/a; the cost and accuracy of --interval_frames; the
# whole Beam job on the DirectRunner and on a Dask cluster; the job's peak RSS at 1x and 10x; and
# the shard codecs' CPU and size on the job's records.
import argparse
import dataclasses
import functools
import glob
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import av

from data_prep import make_demo_data
from data_prep.codec import clip, config


def decode_all(path: str, export_mvs: bool) -> int:
  """(a)/(b): decode every frame, nothing else; returns the frame count."""
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.thread_type = "NONE"  # the patchifier decodes single-threaded too (MV export)
    if export_mvs:
      stream.codec_context.options = {"flags2": "+export_mvs"}
    n = 0
    for frame in c.decode(stream):
      if export_mvs:
        frame.side_data.get("MOTION_VECTORS")
      n += 1
  return n


def record(path: str, cfg, free_between_samples: bool = False) -> bytes:
  """Decode, signals, selection and the encoded record, as one pipeline element does."""
  result = clip.process_path(path, -1, cfg, free_between_samples=free_between_samples)
  if result[0] != "ok":
    raise RuntimeError(f"{path}: {result[1]}")
  return result[1]


def patchify(path: str, cfg) -> int:
  """(c): the record's length (a pool returns it, not the record)."""
  return len(record(path, cfg))


def has_ceiling(cfg) -> bool:
  """(c0) bounds the every-frame rule only (--interval_frames 0, the default)."""
  return cfg.interval_frames == 0


def patchify_between_free(path: str, cfg) -> int:
  """(c0), a counterfactual: the patchify as (c) runs it (every frame decoded, its vectors read and
  queued for the scorer), except that frames between samples are scored at no cost, i.e. not at
  all (IntervalScorer's free_between_samples); the ceiling of any rule that scores every decoded
  frame. Module level: a process pool runs it."""
  return len(record(path, cfg, free_between_samples=True))


def transcode_cost(paths, cfg, rounds: int) -> dict:
  """(d): the full patchify with --transcode always (decode, re-encode to P-only H.264 at the
  working size, decode that with vectors, signals, selection) against (c) on the same clips; the
  ratio is what a stream without usable vectors (HEVC, VP9, AV1) costs over one with them."""
  plain = dataclasses.replace(cfg, transcode="never")
  coded = dataclasses.replace(cfg, transcode="always")
  cpu = {"c": [], "d": []}
  for _ in range(rounds):
    for key, c in (("c", plain), ("d", coded)):
      c0 = time.process_time()
      for p in paths:
        patchify(p, c)
      cpu[key].append(time.process_time() - c0)
  n = len(paths)
  return {"d_patchify_transcode_videos_per_s": n / min(cpu["d"]),
          "transcode_over_patchify": min(cpu["c"]) / min(cpu["d"])}


def _decode_plain(path: str) -> int:
  return decode_all(path, False)


def make_copies(paths, count: int, out_dir: str) -> list:
  """`count` distinct input files cycling over paths (hard links when possible): distinct samples."""
  os.makedirs(out_dir, exist_ok=True)
  out = []
  for i in range(count):
    src = paths[i % len(paths)]
    dst = os.path.join(out_dir, f"copy_{i:05d}{os.path.splitext(src)[1]}")
    try:
      os.link(src, dst)
    except OSError:
      shutil.copyfile(src, dst)
    out.append(dst)
  return out


def _job_output(tmp: str, name: str) -> str:
  return os.path.join(tmp, "beam_out", name)


def job_flags(args, paths_glob: str, output_dir: str) -> list:
  return ["--input", paths_glob, "--output_dir", output_dir, "--budget", str(args.budget),
          "--num_frames", str(args.num_frames), "--image_size", str(args.image_size),
          "--patch_size", str(args.patch_size), "--interval_frames", str(args.interval_frames),
          "--log_every_s", "1e9"]


def timed_job(flags) -> float:
  """Wall-clock seconds of one whole codec_patchify job (start-up, finalisation included)."""
  from data_prep import codec_patchify
  t0 = time.perf_counter()
  codec_patchify.run(flags)
  return time.perf_counter() - t0


def bench_beam(args, paths, cfg, tmp):
  """Whole-job videos/s: bare decode on a pool of `workers` processes, the DirectRunner with as
  many workers (the job's default threads, and Beam's worker processes), and a Dask cluster of as
  many worker processes (one already up, as a user's cluster is, and one the job starts and stops
  itself)."""
  import dask
  from distributed import LocalCluster
  w = args.workers
  videos = make_copies(paths, len(paths) * args.beam_copies, os.path.join(tmp, "beam_in"))
  n = len(videos)
  pattern = os.path.join(tmp, "beam_in", "*")
  ctx = multiprocessing.get_context("spawn")
  out = functools.partial(_job_output, tmp)
  # The job's default DirectRunner mode (worker threads, each feeding its decoder child), and
  # Beam's worker processes for comparison.
  direct = [f"--direct_num_workers={w}"]
  direct_mp = direct + ["--direct_running_mode=multi_processing"]
  # The same job on one video per worker: its fixed start-up and finalisation, which a
  # dataset-sized job amortises; the rest of the direct job's time is its steady state.
  make_copies(paths, w, os.path.join(tmp, "startup_in"))
  startup_glob = os.path.join(tmp, "startup_in", "*")
  # Rounds alternate the modes and keep each one's best: a shared machine's speed drifts over
  # minutes, which one sequential run per mode turns into noise in the ratios.
  runs = {"decode": [], "patchify": [], "direct": [], "direct_mp": [], "startup": [], "dask": []}
  ceiling = has_ceiling(cfg)
  if ceiling:
    runs["between_free"] = []
  # The Dask cluster is up through the rounds, as a user's is, and its job takes its turn in each
  # round: run after the rounds instead, its ratio to the DirectRunner moved with the machine's
  # speed between the two blocks.
  with ctx.Pool(w) as pool, dask.config.set({"distributed.worker.daemon": False}), LocalCluster(
      n_workers=w, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
    dask_flags = ["--runner=dask", f"--dask_client_address={cluster.scheduler_address}"]
    pool.map(_decode_plain, videos[:w])  # workers up and imports done
    pool.map(functools.partial(patchify, cfg=cfg), videos[:w])
    timed_job(job_flags(args, paths[0], out("dask_warmup")) + dask_flags)
    for r in range(args.beam_rounds):
      t0 = time.perf_counter()
      pool.map(_decode_plain, videos, chunksize=1)
      runs["decode"].append(time.perf_counter() - t0)
      # The job's own work without a runner: what Beam adds is direct vs this.
      t0 = time.perf_counter()
      pool.map(functools.partial(patchify, cfg=cfg), videos, chunksize=1)
      runs["patchify"].append(time.perf_counter() - t0)
      if ceiling:
        t0 = time.perf_counter()
        pool.map(functools.partial(patchify_between_free, cfg=cfg), videos, chunksize=1)
        runs["between_free"].append(time.perf_counter() - t0)
      runs["direct"].append(timed_job(job_flags(args, pattern, out(f"direct{r}")) + direct))
      runs["dask"].append(timed_job(job_flags(args, pattern, out(f"dask{r}")) + dask_flags))
      runs["direct_mp"].append(timed_job(job_flags(args, pattern, out(f"direct_mp{r}"))
                                         + direct_mp))
      runs["startup"].append(timed_job(job_flags(args, startup_glob, out(f"startup{r}"))
                                       + direct))
  secs = {k: min(v) for k, v in runs.items()}
  startup = secs.pop("startup")
  secs["dask_cold"] = timed_job(job_flags(args, pattern, out("dask_cold")) + [
      "--runner=dask", f"--dask_workers={w}"])
  vps = {k: n / v for k, v in secs.items()}
  fig = {"beam_videos": n, "beam_workers": w}
  fig.update({f"beam_{k}_videos_per_s": v for k, v in vps.items()})
  fig["beam_over_decode"] = vps["direct"] / vps["decode"]
  fig["beam_startup_s"] = startup
  steady = (n - w) / max(secs["direct"] - startup, 1e-9)
  fig["beam_steady_over_decode"] = steady / vps["decode"]
  fig["beam_over_patchify_pool"] = vps["direct"] / vps["patchify"]
  fig["dask_over_direct"] = vps["dask"] / vps["direct"]
  fig["dask_cold_over_direct"] = vps["dask_cold"] / vps["direct"]
  fig["beam_processes_over_decode"] = vps["direct_mp"] / vps["decode"]
  if ceiling:
    # What this runner would reach if the every-frame rule cost nothing between samples: the
    # pool's (c0) over decode, times the runner's share measured on the real patchify.
    fig["beam_every_frame_ceiling_over_decode"] = (vps["between_free"] / vps["decode"]
                                                   * fig["beam_over_patchify_pool"])
  names = {"decode": f"bare decode, pool of {w}",
           "patchify": f"patchify (c), pool of {w}, no runner",
           "between_free": f"(c0) frames between samples free, pool of {w}",
           "direct": f"Beam DirectRunner, {w} workers (job default)",
           "direct_mp": f"Beam DirectRunner, {w} worker processes",
           "dask": f"Beam DaskRunner, {w} workers (up)",
           "dask_cold": f"Beam DaskRunner, {w} workers (started by job)"}
  lines = [f"whole job on {n} videos (wall-clock; best of {args.beam_rounds} alternating rounds; "
           f"Dask started by the job: one run after them)",
           f"{'mode':<44}{'videos/s':>10}{'vs decode':>11}{'vs direct':>11}"]
  for k, name in names.items():
    if k not in vps:
      continue
    lines.append(f"{name:<44}{vps[k]:>10.2f}{vps[k] / vps['decode']:>11.2f}"
                 f"{vps[k] / vps['direct']:>11.2f}")
  lines.append(f"DirectRunner start-up + finalisation (a job of {w} videos): {startup:.1f} s; "
               f"after it, {steady:.2f} videos/s: beam_steady_over_decode = "
               f"{fig['beam_steady_over_decode']:.2f}")
  lines.append(f"beam_over_decode = {fig['beam_over_decode']:.2f} (goal >= 0.6); "
               f"dask_over_direct = {fig['dask_over_direct']:.2f} (goal >= 0.9); "
               f"beam_over_patchify_pool = {fig['beam_over_patchify_pool']:.2f} (the runner's "
               f"share)")
  if ceiling:
    lines.append(f"beam_every_frame_ceiling_over_decode = "
                 f"{fig['beam_every_frame_ceiling_over_decode']:.2f}: (c0) on the pool over decode, "
                 f"times beam_over_patchify_pool (the job if the frames between samples cost "
                 f"nothing to score)")
  return fig, lines


def bench_compression(args, paths, cfg, tmp):
  """Shard writing per codec on the job's own records (the clips' patchify output): CPU per
  record and file size over the raw records; the job's --shard_compression picks one."""
  from array_record.python import array_record_module
  from data_prep import patchify_output
  recs = [record(p, cfg) for p in paths]
  raw = sum(map(len, recs))
  fig, rows = {}, []
  for codec in ("uncompressed", "snappy", "zstd:1", "zstd:3"):
    path = os.path.join(tmp, f"compression_{codec.replace(':', '')}.array_record")
    best = float("inf")
    for _ in range(args.rounds):
      c0 = time.process_time()
      w = array_record_module.ArrayRecordWriter(path, patchify_output.writer_options(codec))
      for _ in range(5):
        for r in recs:
          w.write(r)
      w.close()
      best = min(best, (time.process_time() - c0) / (5 * len(recs)))
    key = codec.replace(":", "")
    fig[f"compression_{key}_ms_per_record"] = 1e3 * best
    fig[f"compression_{key}_size_ratio"] = os.path.getsize(path) / (5 * raw)
    rows.append(f"{codec + (' (job default)' if codec == patchify_output.DEFAULT_COMPRESSION else ''):<26}"
                f"{1e3 * best:>12.2f}{fig[f'compression_{key}_size_ratio']:>12.3f}")
  lines = [f"shard compression ({len(recs)} records of {raw / len(recs) / 1024:.0f} KiB; CPU, best "
           f"of {args.rounds})", f"{'codec':<26}{'ms/record':>12}{'size/raw':>12}"] + rows
  return fig, lines


# VmHWM, not getrusage: Linux carries ru_maxrss over from the forking parent (this benchmark).
_RSS_JOB = ("import sys; from data_prep import codec_patchify; codec_patchify.run(sys.argv[1:]); "
            "print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') "
            "if l.startswith('VmHWM:')][0])")


def bench_rss(args, paths, cfg, tmp):
  """Peak RSS of the job's driver process (DirectRunner, defaults) at 1x and 10x the videos."""
  peak = {}
  for scale in (1, 10):
    d = os.path.join(tmp, f"rss_in_{scale}")
    make_copies(paths, args.rss_videos * scale, d)
    cmd = [sys.executable, "-c", _RSS_JOB] + job_flags(args, os.path.join(d, "*"),
                                                       os.path.join(tmp, f"rss_out_{scale}"))
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
      raise RuntimeError(f"rss job failed:\n{run.stderr[-3000:]}")
    peak[scale] = int(run.stdout.split("PEAK_RSS_KB")[-1].split()[0]) / 2**20  # GiB
  fig = {"rss_videos_1x": args.rss_videos, "rss_peak_gib_1x": peak[1],
         "rss_peak_gib_10x": peak[10], "rss_ratio_10x": peak[10] / peak[1]}
  lines = [f"job peak RSS (driver process, DirectRunner): {args.rss_videos} videos "
           f"{peak[1]:.3f} GiB, {10 * args.rss_videos} videos {peak[10]:.3f} GiB, "
           f"rss_ratio_10x = {fig['rss_ratio_10x']:.2f} (goal <= 1.3)"]
  return fig, lines


def bench_codec_modes(args, paths, cfg, tmp):
  """One process, one thread: (a) bare decode, (b) + MV export, (c) the full patchify."""
  frames = sum(decode_all(p, False) for p in paths)  # also warms caches and the page cache
  for p in paths:
    patchify(p, cfg)
  modes = {"a_decode": lambda p: decode_all(p, False),
           "b_decode_mvs": lambda p: decode_all(p, True),
           "c_patchify": lambda p: patchify(p, cfg)}
  ceiling = has_ceiling(cfg)
  if ceiling:
    modes["c0_between_free"] = lambda p: patchify_between_free(p, cfg)
  wall = {m: [] for m in modes}
  cpu = {m: [] for m in modes}
  for _ in range(args.rounds):
    for mode, fn in modes.items():  # interleaved, so load from other processes hits all modes
      t0, c0 = time.perf_counter(), time.process_time()
      for p in paths:
        fn(p)
      cpu[mode].append(time.process_time() - c0)
      wall[mode].append(time.perf_counter() - t0)
  # Every mode runs on one thread, so process CPU time is the work done; on a shared machine it
  # is the steadier figure. Wall-clock figures are reported too.
  best = {m: min(v) for m, v in cpu.items()}
  best_wall = {m: min(v) for m, v in wall.items()}
  med = {m: statistics.median(v) for m, v in cpu.items()}
  n = len(paths)
  fig = {"frames": frames, "rounds": args.rounds,
         "timing": "best of rounds, process CPU time (wall-clock in *_wall)"}
  for m in modes:
    fig[f"{m}_videos_per_s"] = n / best[m]
    fig[f"{m}_frames_per_s"] = frames / best[m]
    fig[f"{m}_median_videos_per_s"] = n / med[m]
    fig[f"{m}_videos_per_s_wall"] = n / best_wall[m]
    fig[f"{m}_frames_per_s_wall"] = frames / best_wall[m]
  fig["mvs_over_decode"] = best["a_decode"] / best["b_decode_mvs"]
  fig["patchify_over_decode"] = best["a_decode"] / best["c_patchify"]
  fig["patchify_over_decode_median"] = med["a_decode"] / med["c_patchify"]
  fig["patchify_over_decode_wall"] = best_wall["a_decode"] / best_wall["c_patchify"]
  if ceiling:
    fig["every_frame_ceiling_over_decode"] = best["a_decode"] / best["c0_between_free"]
  lines = [f"one video at a time: best of {args.rounds} rounds of CPU time (median) and wall-clock",
           f"{'mode':<24}{'videos/s':>18}{'frames/s':>10}{'vs (a)':>8}"
           f"{'wall videos/s':>15}{'wall vs (a)':>12}"]
  names = {"a_decode": "(a) bare decode", "b_decode_mvs": "(b) decode + MV export",
           "c_patchify": "(c) full patchify", "c0_between_free": "(c0) (c), between free"}
  for m in modes:
    lines.append(
        f"{names[m]:<24}{fig[f'{m}_videos_per_s']:>9.1f} ({fig[f'{m}_median_videos_per_s']:6.1f})"
        f"{fig[f'{m}_frames_per_s']:>10.0f}{best['a_decode'] / best[m]:>8.2f}"
        f"{fig[f'{m}_videos_per_s_wall']:>15.1f}{best_wall['a_decode'] / best_wall[m]:>12.2f}")
  lines.append(f"patchify_over_decode (c/a) = {fig['patchify_over_decode']:.2f} CPU time "
               f"(median {fig['patchify_over_decode_median']:.2f}, wall-clock "
               f"{fig['patchify_over_decode_wall']:.2f}); target >= 0.7")
  if ceiling:
    lines.append(f"every_frame_ceiling_over_decode (c0/a) = "
                 f"{fig['every_frame_ceiling_over_decode']:.2f}: (c) with the frames between "
                 f"samples decoded and read but scored for free, the most any every-frame rule "
                 f"reaches")
  return fig, lines


def bench_transcode(args, paths, cfg, tmp):
  """(d): the cost of --transcode always against (c) on the same clips."""
  if not args.transcode_rounds:
    return {}, []
  fig = transcode_cost(paths, cfg, args.transcode_rounds)
  return fig, [f"{'(d) patchify, transcode':<24}{fig['d_patchify_transcode_videos_per_s']:>9.1f}"
               f"{'':>18}{fig['transcode_over_patchify']:>8.2f} of (c): --transcode always, CPU time"]


def kept_on(positions, boxes, idx, name: str, patch: int) -> int:
  """Kept patches that overlap the object anywhere in their slot's sampling interval."""
  count = 0
  for t, h, w in positions:
    lo = idx[t - 1] + 1 if t else 0
    count += any(h * patch < y1 and (h + 1) * patch > y0 and w * patch < x1
                 and (w + 1) * patch > x0
                 for y0, x0, y1, x1 in (boxes[i][name] for i in range(lo, idx[t] + 1)))
  return count


INTERVAL_VALUES = (0, 1, 2, 4, 8)


def bench_interval(args, paths, cfg, tmp):
  """--interval_frames M: kept patches on the two motion cases (T=8, 112 px, K=64; intervals of 6
  and 16 decoded frames) and the CPU cost of (c) on the benchmark clips, per M."""
  fig, lines = {}, []
  cases = {}
  for interval in (6, 16):
    for objects in (("travel",), ("travel", "jitter")):
      path = os.path.join(tmp, f"motion_{interval}_{'_'.join(objects)}.mp4")
      cases[(interval, objects)] = (path, make_demo_data.motion_case_clip(path, interval, 8, objects))
  head = f"{'M':>4}{'c/a CPU':>9}" + "".join(
      f"{f'L={i} ' + ('alone' if len(o) == 1 else 'both t/j'):>14}" for i, o in cases)
  lines += ["--interval_frames M: (c)/(a) CPU time on the clips above; kept of 64 on the "
            "travelling (t) and jittering (j) square, intervals of L decoded frames", head]
  for m in INTERVAL_VALUES:
    mcfg = dataclasses.replace(cfg, interval_frames=m)
    cpu_a, cpu_c = [], []
    for _ in range(args.interval_rounds):
      c0 = time.process_time()
      for p in paths:
        decode_all(p, False)
      cpu_a.append(time.process_time() - c0)
      c0 = time.process_time()
      for p in paths:
        patchify(p, mcfg)
      cpu_c.append(time.process_time() - c0)
    ratio = min(cpu_a) / min(cpu_c)
    fig[f"interval_{m}_patchify_over_decode"] = ratio
    row = f"{m:>4}{ratio:>9.2f}"
    for (interval, objects), (path, boxes) in cases.items():
      small = config.PatchifyConfig(budget=0.125, num_frames=8, image_size=112,
                                           patch_size=14, iframe="scored",
                                           interval_frames=m).validate()
      rec = clip.patchify_file(path, small)
      idx = rec["frame_indices"]
      got = [kept_on(rec["positions"], boxes, idx, o, 14) for o in objects]
      key = f"interval_{m}_L{interval}_{'both' if len(objects) > 1 else 'alone'}"
      fig[key + "_travel"] = got[0]
      if len(objects) > 1:
        fig[key + "_jitter"] = got[1]
      row += f"{'/'.join(map(str, got)):>14}"
    lines.append(row)
  return fig, lines


# Each section: (args, clip paths, cfg, temp dir) -> (figures for --json, table lines).
def bench_reencode(args, paths, cfg, tmp):
  """(r): a record with --score_on reencode at T = 64 (the published geometry's frame count)
  against (a) bare decode of the same clips (up to their last frame; the 64 samples span the
  clip), one process, one thread, CPU time; (c64) is the source-stream scoring at T = 64."""
  c64 = dataclasses.replace(cfg, num_frames=64)
  r64 = dataclasses.replace(c64, score_on="reencode")
  modes = {"a_decode": lambda p: decode_all(p, False), "c64_patchify": lambda p: patchify(p, c64),
           "r_patchify_reencode": lambda p: patchify(p, r64)}
  for fn in modes.values():  # warm caches and the compiled kernels
    fn(paths[0])
  cpu = {m: [] for m in modes}
  for _ in range(args.rounds):
    for mode, fn in modes.items():
      c0 = time.process_time()
      for p in paths:
        fn(p)
      cpu[mode].append(time.process_time() - c0)
  best = {m: min(v) for m, v in cpu.items()}
  n = len(paths)
  fig = {f"{m}_t64_videos_per_s": n / best[m] for m in modes}
  fig["reencode_over_decode"] = best["a_decode"] / best["r_patchify_reencode"]
  fig["reencode_over_source_scoring"] = best["c64_patchify"] / best["r_patchify_reencode"]
  lines = [f"--score_on reencode at T=64: best of {args.rounds} rounds, CPU time",
           f"{'(a) bare decode':<24}{fig['a_decode_t64_videos_per_s']:>9.1f}",
           f"{'(c64) source scoring':<24}{fig['c64_patchify_t64_videos_per_s']:>9.1f}"
           f"{best['a_decode'] / best['c64_patchify']:>8.2f}",
           f"{'(r) reencode scoring':<24}{fig['r_patchify_reencode_t64_videos_per_s']:>9.1f}"
           f"{fig['reencode_over_decode']:>8.2f}",
           f"reencode_over_decode (r/a) = {fig['reencode_over_decode']:.2f}; "
           f"(r) over (c64) = {fig['reencode_over_source_scoring']:.2f}"]
  return fig, lines


SECTIONS = {"codec": bench_codec_modes, "transcode": bench_transcode, "reencode": bench_reencode,
            "interval": bench_interval, "beam": bench_beam, "rss": bench_rss,
            "compression": bench_compression}


def make_clips(out_dir, count, size, frames, background, noise, seed):
  import numpy as np
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    video, _ = make_demo_data.render_clip(rng, size, frames, int(rng.integers(10)),
                                          int(rng.integers(1, 4)), background, noise)
    path = os.path.join(out_dir, f"bench_{i:03d}.mp4")
    make_demo_data.encode_clip(path, video)
    paths.append(path)
  return paths


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--input", default=None, help="glob of clips; default: generate a set")
  ap.add_argument("--clips", type=int, default=4, help="generated clips")
  ap.add_argument("--size", type=int, default=224, help="generated clip side")
  ap.add_argument("--frames", type=int, default=250,
                  help="frames per generated clip (250 = 10 s at 25 fps)")
  ap.add_argument("--background", choices=("texture", "natural"), default="natural")
  ap.add_argument("--noise", type=float, default=2.0, help="generated per-frame noise sigma")
  ap.add_argument("--num_frames", type=int, default=16, help="patchify: sampled frames")
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--patch_size", type=int, default=14)
  ap.add_argument("--budget", type=float, default=0.125)
  ap.add_argument("--interval_frames", type=int, default=0,
                  help="patchify: frames scored per sampling interval (0 = every frame)")
  ap.add_argument("--rounds", type=int, default=5, help="best of this many rounds is reported")
  ap.add_argument("--sections", default=",".join(SECTIONS),
                  help=f"comma-separated subset of {list(SECTIONS)}")
  ap.add_argument("--workers", type=int, default=2, help="beam: worker processes per runner")
  ap.add_argument("--beam_rounds", type=int, default=2,
                  help="beam: alternating rounds of decode / patchify / DirectRunner (best kept)")
  ap.add_argument("--beam_copies", type=int, default=100,
                  help="beam: job input = clips x this (enough that start-up is a small share)")
  ap.add_argument("--rss_videos", type=int, default=20, help="rss: videos at 1x (10x: ten times)")
  ap.add_argument("--json", default=None, help="write the figures to this path")
  ap.add_argument("--interval_rounds", type=int, default=2,
                  help="interval: rounds of (a) and (c) per --interval_frames value")
  ap.add_argument("--transcode_rounds", type=int, default=2,
                  help="rounds of (d), patchify with --transcode always; 0 skips it")
  args = ap.parse_args(argv)
  sections = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    ap.error(f"--sections: unknown {unknown}; known: {list(SECTIONS)}")
  cfg = config.PatchifyConfig(budget=args.budget, num_frames=args.num_frames,
                                     image_size=args.image_size,
                                     patch_size=args.patch_size,
                                     interval_frames=args.interval_frames).validate()
  with tempfile.TemporaryDirectory() as tmp:
    if args.input:
      paths = sorted(glob.glob(args.input))
      if not paths:
        ap.error(f"--input {args.input!r} matches no files")
      source = args.input
    else:
      t0 = time.time()
      paths = make_clips(tmp, args.clips, args.size, args.frames, args.background, args.noise, 0)
      source = (f"{args.clips} generated clips, {args.size}x{args.size}, {args.frames} frames, "
                f"{args.background} background, noise {args.noise} (made in "
                f"{time.time() - t0:.1f}s)")
    fig = {"videos": len(paths), "clips": source, "num_frames": cfg.num_frames,
           "image_size": cfg.image_size, "budget": cfg.budget, "interval_frames": cfg.interval_frames}
    print(f"clips: {source}")
    print(f"patchify: T={cfg.num_frames}, {cfg.image_size}px, patch {cfg.patch_size}, "
          f"budget {cfg.budget}")
    for name in sections:
      figures, lines = SECTIONS[name](args, paths, cfg, tmp)
      fig.update(figures)
      print("\n".join(lines), flush=True)
  if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(fig, f, indent=1, sort_keys=True)
    os.replace(tmp, args.json)
  return fig


if __name__ == "__main__":
  main()
