"""Pod efficiency from ahead-of-time compiles: is the train step compute-bound, light on communication, sharded?

python benchmarks/bench_aot.py [--json PATH] [--out DIR] [--cases large_v5p128,base_v5e256,base_h100x8]
    [--flags='--config.model.remat=dots ...']

Each case is one `python -m ovenc_jax.aot.compile` run (its own process, one at a time) of a `pod=` preset
(ovenc_jax/configs/common.py) on 16-frame clips at 12.5% (512 tokens, one clip a row), 1M centers, up to 10
labels a sample; the `_official` cases (not run by default) use `geometry=official`: 64-frame clips at
12.5%, 2,048 tokens a row. From its report (ovenc_jax.aot.figures):
- compute_fraction = t_compute / max(t_compute, t_hbm): t_compute is the model's own FLOP count at
  the chip's peak, t_hbm XLA's bytes accessed at the chip's HBM bandwidth (the splash kernels declare
  their FLOPs and K/V re-reads to XLA: ovenc_jax/model/attention/splash.py; the fused MLP kernels their
  FLOPs, recomputation included, and streamed bytes: ovenc_jax/model/fused_mlp.py). XLA's bytes are an upper bound
  of HBM traffic (each op's operands and results, VMEM prefetch copies included), so this fraction is
  a lower bound. GPU targets have no XLA cost analysis: there compute_fraction is
  compute_fraction_hbm_traffic (<name>_compute_fraction_from says which), so base_h100x8_compute_fraction
  is the 8 x H100 compile's figure.
- compute_fraction_hbm_traffic: the same with t_hbm from the bytes the compiled program keeps in HBM,
  each counted once (ovenc_jax/aot/hlo_traffic.py): on TPU, XLA's bytes also count operands that
  memory-space assignment placed in VMEM, and a sliced prefetch once per slice for its whole source.
  Beside compute_fraction, not instead of it; on GPU targets it is the only one.
- model_over_xla_flops, memory per device (and whether it fits), collective bytes per device per step
  (results of every collective, counted once per op in the program) beside the parameter bytes,
  parameter + optimizer bytes per device against their total over the mesh's fsdp size, and the
  replicated tensors over 64 MiB.
Goals: large_v5p128_compute_fraction >= 0.6, base_v5e256_compute_fraction >= 0.5, both fit,
nothing replicated over 64 MiB, parameter + optimizer bytes per device <= 1.25 x total / fsdp.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from ovenc_format import atomic_io
from ovenc_jax.aot import compile as aot
from ovenc_jax.aot.figures import figures

# name: (variant, pod preset / topology, extra config args, tokens a row). The official-geometry
# cases are the published 64-frame clip: 2,048 kept tokens a row, t on the 64-slot timeline.
CASES = {
    "large_v5p128": ("large", "v5p-128", "", 512),
    "base_v5e256": ("base", "v5e-256", "", 512),
    "base_h100x8": ("base", "h100x8", "", 512),
    "base_v5e256_official": ("base", "v5e-256", ",geometry=official", 2048),
    "large_v5p128_official": ("large", "v5p-128", ",geometry=official", 2048),
}
DEFAULT_CASES = ("large_v5p128", "base_v5e256", "base_h100x8")
LOSS = ["--config.loss.num_classes=1000000", "--config.input.max_labels=10"]


def case_flags(name: str) -> list[str]:
  """One clip a row at the case's token budget, 1M centers, up to 10 labels a sample."""
  tokens = CASES[name][3]
  return [f"--config.input.tokens_per_row={tokens}", "--config.input.max_segments=1", *LOSS]
GOALS = {"large_v5p128_compute_fraction": 0.6, "base_v5e256_compute_fraction": 0.5}


def compile_case(name: str, out_dir: str, flags=()) -> dict | None:
  """The case's aot report; a GPU preset falls back to XLA attention where the cuDNN library (which
  tracing cuDNN attention queries for its version) is not installed, and the report says so."""
  variant, pod, extra, _ = CASES[name]
  path = os.path.join(out_dir, f"{name}.json")
  if not os.path.exists(path):
    cmd = [sys.executable, "-m", "ovenc_jax.aot.compile",
           f"--config={aot.PRETRAIN_CONFIG}:variant={variant},pod={pod}{extra}",
           f"--topology={pod}", f"--json={path}", *case_flags(name), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    fallback = not os.path.exists(path) and "cuDNN not found" in proc.stderr
    if fallback:
      proc = subprocess.run(cmd + ["--config.model.attention=xla"], capture_output=True, text=True)
    if proc.returncode not in (0, 1) or not os.path.exists(path):
      print(f"{name}: compile failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
      return None
    with open(path) as f:
      report = json.load(f)
    report["attention_fallback_xla"] = int(fallback)
    atomic_io.save_json(path, report)
    return report
  with open(path) as f:  # a report kept from an earlier run (--out)
    return json.load(f)


def _gib(v):
  return None if v is None else v / 2 ** 30


def _fmt(v, unit=""):
  if v is None:
    return "n/a"
  if unit == "MiB":
    return f"{v / 2 ** 20:,.0f}"
  if unit == "ms":
    return f"{v * 1e3:.1f}"
  return f"{v:.2f}" if isinstance(v, float) else str(v)


def table(names, res) -> str:
  rows = [("devices (mesh fsdp)", lambda n: f"{res[n + '_devices']} ({res[n + '_fsdp']})"),
          ("global batch (rows x tokens)", lambda n: f"{res[n + '_global_batch']} x {CASES[n][3]}"),
          ("compute_fraction (from)", lambda n: f"{_fmt(res[n + '_compute_fraction'])} "
                                                f"({res[n + '_compute_fraction_from']})"),
          ("step ms at peak FLOPs (model)", lambda n: _fmt(res[n + "_step_s_model_flops"], "ms")),
          ("step ms at HBM bw (XLA bytes)", lambda n: _fmt(res[n + "_step_s_hbm"], "ms")),
          ("compute_fraction, HBM traffic", lambda n: _fmt(res[n + "_compute_fraction_hbm_traffic"])),
          ("step ms at HBM bw (HBM traffic)", lambda n: _fmt(res[n + "_step_s_hbm_traffic"], "ms")),
          ("GiB/dev: XLA bytes, HBM traffic", lambda n: f"{_fmt(_gib(res[n + '_bytes_accessed_per_device']))}, "
                                                       f"{_fmt(_gib(res[n + '_hbm_traffic_bytes_per_device']))}"),
          ("model / XLA FLOPs", lambda n: _fmt(res[n + "_model_over_xla_flops"])),
          ("memory GiB / HBM GiB", lambda n: f"{_fmt(res[n + '_memory_gib'])} / {res[n + '_hbm_gib']:.0f}"),
          ("params MiB/device (total)", lambda n: f"{_fmt(res[n + '_param_bytes_per_device'], 'MiB')} "
                                                  f"({_fmt(res[n + '_param_bytes_total'], 'MiB')})"),
          ("params+opt / (total/fsdp)", lambda n: _fmt(res[n + "_param_opt_over_total_per_fsdp"])),
          ("collectives MiB/device/step", lambda n: _fmt(res[n + "_collective_bytes_per_device"], "MiB")),
          ("  all-gather / reduce-scatter", lambda n: f"{_fmt(res.get(n + '_all_gather_bytes_per_device', 0), 'MiB')}"
                                                      f" / {_fmt(res.get(n + '_reduce_scatter_bytes_per_device', 0), 'MiB')}"),
          ("  all-reduce", lambda n: _fmt(res.get(n + "_all_reduce_bytes_per_device", 0), "MiB")),
          ("replicated > 64 MiB", lambda n: _fmt(res[n + "_replicated_over_64mib"])),
          ("compile s", lambda n: f"{res[n + '_compile_s']:.0f}"),
          ("attention", lambda n: "xla (no cuDNN here)" if res[n + "_attention_fallback_xla"] else "preset")]
  width = max(20, *(len(n) + 2 for n in names))
  lines = [f"{'':32s}" + "".join(f"{n:>{width}s}" for n in names)]
  for label, get in rows:
    lines.append(f"{label:32s}" + "".join(f"{get(n):>{width}s}" for n in names))
  for key, goal in GOALS.items():
    if key in res:
      got = res[key]
      lines.append(f"goal {key} >= {goal}: {_fmt(got)} ({'met' if got is not None and got >= goal else 'NOT met'})")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json", help="write the figures here")
  ap.add_argument("--out", help="keep the per-case aot reports here (existing ones are reused)")
  ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                  help=f"comma-separated, of: {', '.join(CASES)}")
  ap.add_argument("--flags", default="", help="config flags added to every case (a step change to compare), "
                  "e.g. --flags=--config.model.remat=dots; give a fresh --out with them")
  args = ap.parse_args(argv)
  names = [n for n in args.cases.split(",") if n]
  for n in names:
    if n not in CASES:
      raise SystemExit(f"--cases: {n!r} is unknown; known: {', '.join(CASES)}")
  out_dir = args.out or tempfile.mkdtemp(prefix="bench_aot_")
  os.makedirs(out_dir, exist_ok=True)
  res, done = {}, []
  for n in names:
    r = compile_case(n, out_dir, args.flags.split())
    if r is not None:
      res.update(figures(n, r))
      res[n + "_compute_fraction_from"] = "xla_bytes"
      if res[n + "_compute_fraction"] is None:  # GPU targets: XLA gives no bytes accessed
        res[n + "_compute_fraction"] = res[n + "_compute_fraction_hbm_traffic"]
        res[n + "_compute_fraction_from"] = "hbm_traffic"
      done.append(n)
  print(table(done, res))
  if args.json:
    atomic_io.save_json(args.json, res)


if __name__ == "__main__":
  main()
