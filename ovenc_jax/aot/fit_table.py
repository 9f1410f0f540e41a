"""The "Will it fit?" table of docs/benchmarks.md: `ovenc_jax.aot.compile` for base/large on clips and images, per target, one compile at a time.

ovenc-aot-fit-table --out DIR [--json PATH] [--cached] [--inputs clips64,images448]   (rows whose DIR/<row>.json exists are reused)
"""
import argparse
import json
import os
import subprocess
import sys

from ovenc_jax.aot import compile as aot

# input: (tokens per row, samples per row, global batch by target, config args); 12.5% of a 16-frame
# clip = 512 tokens. The geometry=official rows: 64-frame clips (2,048 tokens a row) and 448 px stills
# (1,024 tokens, two a row), the same tokens per step as the rows above.
INPUTS = {
    "clips": (512, 1, {"v5e-256": 1024, "v5p-128": 1024, "h100x8": 256}, ""),
    "images": (256, 1, {"v5e-256": 4096, "v5p-128": 4096, "h100x8": 1024}, ""),
    "clips64": (2048, 1, {"v5e-256": 256, "v5p-128": 256, "h100x8": 64}, ",geometry=official"),
    "images448": (2048, 2, {"v5e-256": 512, "v5p-128": 512, "h100x8": 128}, ",geometry=official"),
}
VARIANTS = ("base", "large")
TARGETS = ("v5e-256", "v5p-128", "h100x8")
# XLA attention: these rows are the baseline that bench_aot.py's pod presets (splash / cuDNN, FSDP) are read against.
COMMON = ["--config.model.dtype=bfloat16", "--config.loss.num_classes=1000000", "--config.input.max_labels=10",
          "--config.model.attention=xla"]


def run_row(out_dir, variant, inp, target, compile_missing=True):
  tokens, segments, batches, args = INPUTS[inp]
  path = os.path.join(out_dir, f"{variant}_{inp}_{target}.json")
  if not os.path.exists(path) and not compile_missing:
    return None
  if not os.path.exists(path):
    cmd = [sys.executable, "-m", "ovenc_jax.aot.compile", f"--config={aot.PRETRAIN_CONFIG}:variant={variant}{args}",
           f"--topology={target}", f"--json={path}", f"--config.input.tokens_per_row={tokens}",
           f"--config.input.max_segments={segments}", f"--config.input.global_batch_size={batches[target]}",
           *COMMON]
    proc = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True)
    if proc.returncode not in (0, 1) or not os.path.exists(path):
      print(f"{variant} {inp} {target}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
      return None
  with open(path) as f:
    return json.load(f)


def table(rows) -> str:
  out = ["| model | input | target | global batch | memory/device (of HBM) | fits | roofline step | "
         "largest collective (all, per device) |",
         "|---|---|---|---|---|---|---|---|"]
  for (variant, inp, target), r in rows.items():
    if r is None:
      out.append(f"| {variant} | {inp} | {target} | not produced | | | | |")
      continue
    mem = r.get("memory", {}).get("total")
    mem_s = "compiler: out of HBM" if mem is None else f"{mem / 2 ** 30:.1f} GiB ({r['hbm_bytes'] / 2 ** 30:.0f})"
    step = r.get("step_s_roofline")
    step_s = "" if step is None else f"{step * 1e3:.0f} ms ({r['bound']})"
    coll = r.get("collectives") or {}
    big = coll.get("largest") or []
    total = sum(v["bytes"] for v in coll.get("by_kind", {}).values())
    big_s = f"{big[0]['kind']} {big[0]['bytes'] / 2 ** 20:.0f} MiB (all: {total / 2 ** 20:.0f} MiB)" if big else ""
    out.append(f"| {variant} | {inp} {r['tokens_per_row']} tok | {target} ({r['num_devices']}) | "
               f"{r['global_batch']} | {mem_s} | {'yes' if r['fits'] else 'NO'} | {step_s} | {big_s} |")
  return "\n".join(out)


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", required=True, help="folder for the per-row JSON reports")
  ap.add_argument("--json", help="write all rows here")
  ap.add_argument("--targets", default=",".join(TARGETS))
  ap.add_argument("--inputs", default=",".join(INPUTS), help=f"rows of these inputs, of {sorted(INPUTS)}")
  ap.add_argument("--cached", action="store_true", help="compile nothing: tabulate the reports in --out")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  unknown = sorted(set(args.inputs.split(",")) - set(INPUTS))
  if unknown:
    ap.error(f"--inputs: unknown {unknown}; known: {sorted(INPUTS)}")
  keys = [(v, i, t) for i in args.inputs.split(",") for v in VARIANTS for t in args.targets.split(",")]
  rows = {}
  # The GPU compiles (8 devices) are much cheaper than the 256-chip TPU ones: cheap rows first.
  for key in sorted(keys, key=lambda k: not k[2].startswith(tuple(aot.GPU_MODELS))):
    rows[key] = run_row(args.out, *key, compile_missing=not args.cached)
    print(table({key: rows[key]}).splitlines()[-1], flush=True)
  print(table({k: rows[k] for k in keys}))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"_".join(k): v for k, v in rows.items()}, f, indent=1)


if __name__ == "__main__":
  main()
