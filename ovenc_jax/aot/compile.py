"""Ahead-of-time compile of the real train step for a TPU or GPU topology on a CPU host: does it fit, how fast, what talks.

ovenc-aot --config ovenc_jax/configs/pretrain.py:variant=base --topology v5e-256 [--json PATH]
(or python -m ovenc_jax.aot.compile ...)
"""
import dataclasses
import math
import os
import re
import sys
import time

from ovenc_jax.aot import hlo_traffic
from ovenc_jax.train import observability

GiB = 2 ** 30
REPLICATED_WARN_BYTES = 64 * 2 ** 20
TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets")
# The packaged pretrain config by absolute path, for command lines run from any directory.
PRETRAIN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                               "pretrain.py")


def prepare_host_environment() -> None:
  """Sets up this process for compile-only targets; call it before jax is imported.

  The host side stays on the CPU (the targets' devices come from their topology, not from this
  host), libtpu asks no metadata server, and the libtpu lock file (which guards a real TPU, absent
  here) does not stop a second compile elsewhere. Raises RuntimeError when jax was already imported
  onto another platform, as it reads JAX_PLATFORMS only when imported.
  """
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  jax = sys.modules.get("jax")
  if jax is None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    return
  platforms = jax.config.jax_platforms
  if platforms != "cpu":
    raise RuntimeError(f"ovenc_jax.aot: jax was imported with JAX_PLATFORMS={platforms!r}; compile-only "
                       f"targets need the host on the CPU: call aot.prepare_host_environment() before "
                       f"importing jax, or set JAX_PLATFORMS=cpu")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-device figures of one accelerator (datasheet values; a GPU's HBM and bandwidth come from its
  target description). peak_flops per compute dtype: on TPU a float32 matmul at default precision is
  one bfloat16 pass, on GPU it runs as TF32."""
  hbm_bytes: float
  hbm_bandwidth: float
  peak_flops: dict


TPU_GENERATIONS = {
    # name: (chip, topology dims, megacore: `<gen>-N` counts TensorCores, two per chip)
    "v4": (Chip(32 * GiB, 1.2e12, {"bfloat16": 275e12, "float32": 275e12}), 3, True),
    "v5e": (Chip(16 * GiB, 819e9, {"bfloat16": 197e12, "float32": 197e12}), 2, False),
    "v5p": (Chip(95 * GiB, 2765e9, {"bfloat16": 459e12, "float32": 459e12}), 3, True),
    "v6e": (Chip(32 * GiB, 1640e9, {"bfloat16": 918e12, "float32": 918e12}), 2, False),
}
GPU_MODELS = {
    # name: (target description file, dense tensor-core peaks)
    "h100": ("h100_sxm.txtpb", {"bfloat16": 989e12, "float32": 494.5e12}),
    "a100": ("a100_sxm_80.txtpb", {"bfloat16": 312e12, "float32": 156e12}),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass
class Target:
  name: str
  chip: Chip
  devices: list


def _grid(chips: int, dims: int) -> tuple[int, ...]:
  """Power-of-two chip count -> the squarest torus, smallest axes first (256, 2 -> 16x16)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"--topology: {chips} chips is not a power of two")
  shape = [1] * dims
  for i in range(int(math.log2(chips))):
    shape[-1 - i % dims] *= 2
  return tuple(sorted(shape))


def parse_topology(name: str) -> dict:
  """`v5e-256` / `v5e:16x16` / `h100x8[x2]` -> how to ask jax for its devices. Errors name --topology."""
  m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", name)
  if m and m.group(1) in TPU_GENERATIONS:
    gen, n = m.group(1), int(m.group(2))
    chip, dims, megacore = TPU_GENERATIONS[gen]
    if megacore and n % 2:
      raise ValueError(f"--topology={name}: {gen}-N counts TensorCores (two per chip); N must be even")
    grid = _grid(n // 2 if megacore else n, dims)
    return dict(platform="tpu", gen=gen, chip=chip, topology_name=f"{gen}:{'x'.join(map(str, grid))}",
                chip_config_name="megacore" if megacore else "default")
  m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})", name)
  if m and m.group(1) in TPU_GENERATIONS:
    chip, dims, megacore = TPU_GENERATIONS[m.group(1)]
    if len(m.group(2).split("x")) != dims:
      raise ValueError(f"--topology={name}: {m.group(1)} topologies have {dims} dimensions")
    return dict(platform="tpu", gen=m.group(1), chip=chip, topology_name=name,
                chip_config_name="megacore" if megacore else "default")
  m = re.fullmatch(r"([a-z]\d+)x(\d+)(?:x(\d+))?", name)
  if m and m.group(1) in GPU_MODELS:
    model, per_host, hosts = m.group(1), int(m.group(2)), int(m.group(3) or 1)
    path = os.path.join(TARGETS_DIR, GPU_MODELS[model][0])
    with open(path) as f:
      text = f.read()
    fields = dict(re.findall(r"^\s*(device_memory_size|memory_bandwidth):\s*(\d+)", text, re.M))
    chip = Chip(float(fields["device_memory_size"]), float(fields["memory_bandwidth"]), GPU_MODELS[model][1])
    return dict(platform="cuda", chip=chip, target_config=text, topology=f"1x{hosts}x{per_host}")
  known = sorted([f"{g}-N" for g in TPU_GENERATIONS] + [f"{g}:AxB[xC]" for g in TPU_GENERATIONS] +
                 [f"{g}x8[xHOSTS]" for g in GPU_MODELS])
  raise ValueError(f"--topology={name!r} is not understood; forms: {', '.join(known)}")


def get_target(name: str, num_slices: int = 1) -> Target:
  """Compile-only devices of the topology (no accelerator needed)."""
  from jax.experimental import topologies
  spec = parse_topology(name)
  if spec["platform"] == "tpu":
    desc = topologies.get_topology_desc(
        topology_name=spec["topology_name"], platform="tpu", chip_config_name=spec["chip_config_name"],
        chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
  else:
    if num_slices != 1:
      raise ValueError(f"--num_slices={num_slices}: GPU topologies take hosts in the name (h100x8x2)")
    try:
      import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError as e:
      raise RuntimeError("GPU targets need jax-cuda12-plugin and jax-cuda12-pjrt (requirements-aot-gpu.txt)") from e
    desc = topologies.get_topology_desc(topology_name="", platform="cuda", topology=spec["topology"],
                                        target_config=spec["target_config"])
  return Target(name, spec["chip"], list(desc.devices))


# ---- the model's own FLOP count ------------------------------------------------------------------

# One count for the trainer's logged MFU and these reports.
model_flops = observability.model_flops


# ---- reading the compiled program ----------------------------------------------------------------

def _shape_bytes(type_str: str) -> list[tuple[str, int]]:
  return [(shape, nbytes) for shape, nbytes, _ in hlo_traffic.arrays(type_str)]


def collectives(hlo_text: str) -> dict:
  """Collective ops of the optimised HLO: count and result bytes per device, by kind, and the largest.

  Async starts (`all-gather-start`, ...) type as ((operands), (results), context...), and XLA combines
  many tensors into one of them: their results are summed. Counted statically: an op inside a loop
  body counts once.
  """
  pat = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
  by_kind = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  ops = []
  for line in hlo_text.splitlines():
    mt = pat.match(line)
    if not mt:
      continue
    name, type_str, kind, start = mt.groups()
    if start and kind != "all-reduce":
      parts = hlo_traffic.tuple_elements(type_str)
      shapes = _shape_bytes(parts[1]) if len(parts) >= 2 else []
    else:
      shapes = _shape_bytes(type_str)
    if not shapes:
      continue
    nbytes = sum(b for _, b in shapes)
    by_kind[kind]["count"] += 1
    by_kind[kind]["bytes"] += nbytes
    ops.append(dict(name=name, kind=kind, bytes=nbytes, shapes=[s for s, _ in shapes]))
  ops.sort(key=lambda o: -o["bytes"])
  return {"by_kind": {k: v for k, v in by_kind.items() if v["count"]}, "largest": ops[:5]}


def _spec(sharding) -> list:
  return [list(a) if isinstance(a, tuple) else a for a in sharding.spec]


def sharding_report(abstract_state) -> dict:
  """Per tensor: shape, partition spec and bytes per device, grouped as params / centers / opt_state."""
  import jax
  groups = {"params": abstract_state["params"]["encoder"], "centers": abstract_state["params"]["centers"],
            "opt_state": abstract_state["opt_state"]}
  out, warnings = {}, []
  for group, tree in groups.items():
    rows = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      key = jax.tree_util.keystr(path) or "[]"
      nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
      per_device = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
      rows[key] = dict(shape=list(leaf.shape), spec=_spec(leaf.sharding), bytes=nbytes,
                       bytes_per_device=per_device)
      if leaf.sharding.is_fully_replicated and nbytes > REPLICATED_WARN_BYTES:
        warnings.append(f"{group}{key} {list(leaf.shape)} is replicated: {nbytes / 2 ** 20:.0f} MiB on every device")
    out[group] = rows
  return {"tensors": out, "warnings": warnings}


def _oom_message(err: Exception) -> str | None:
  text = str(err)
  if any(s in text for s in ("RESOURCE_EXHAUSTED", "exceeds available HBM", "Out of memory", "out of memory")):
    return text
  return None


def analyse(config, target: Target, dump_dir: str | None = None, save_path: str | None = None) -> dict:
  """Builds the trainer on the target's devices, lowers and compiles its step, and measures it."""
  from ovenc_format import atomic_io
  from ovenc_jax.train import trainer as train
  t0 = time.perf_counter()
  trainer = train.Trainer(config, workdir="", devices=target.devices)
  lowered = trainer.lower()
  mesh = dict(trainer.mesh.shape)
  n_dev = len(target.devices)
  batch_shards = math.prod(mesh[a] for a in trainer.batch_axes)
  flops_model = model_flops(config, math.prod(mesh[a] for a in trainer.class_axes),
                            trainer.abstract_state["params"]["centers"].shape[0], mesh["tensor"])
  dtype = str(config.model.dtype)
  r = dict(topology=target.name, device_kind=target.devices[0].device_kind, num_devices=n_dev, mesh=mesh,
           global_batch=int(config.input.global_batch_size),
           per_device_batch=int(config.input.global_batch_size) // batch_shards,
           tokens_per_row=int(config.input.tokens_per_row), compute_dtype=dtype,
           hbm_bytes=target.chip.hbm_bytes, shardings=sharding_report(trainer.abstract_state),
           model_flops_per_device=flops_model["total"] / n_dev,
           model_flops_breakdown={k: v / n_dev for k, v in flops_model.items()})
  if dump_dir:
    atomic_io.atomic_write(os.path.join(dump_dir, "train_step.stablehlo.mlir"),
                           lambda f: f.write(lowered.as_text()), mode="w")
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory verdict is handled
    msg = _oom_message(e)
    if msg is None:
      raise
    r.update(fits=False, compiler_message=msg, compile_s=time.perf_counter() - t0)
    return r
  r["compile_s"] = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  mem = dict(arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
             aliased=ma.alias_size_in_bytes, temporaries=ma.temp_size_in_bytes,
             code=ma.generated_code_size_in_bytes)
  mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]
  r.update(memory=mem, fits=mem["total"] <= target.chip.hbm_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
  accessed = float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
  r.update(xla_flops_per_device=xla_flops, bytes_accessed_per_device=accessed,
           recompute_flops_per_device=None if xla_flops is None else xla_flops - r["model_flops_per_device"])
  peak = target.chip.peak_flops[dtype]
  t_compute = (xla_flops if xla_flops is not None else r["model_flops_per_device"]) / peak
  t_memory = None if accessed is None else accessed / target.chip.hbm_bandwidth
  r.update(peak_flops=peak, hbm_bandwidth=target.chip.hbm_bandwidth, step_s_compute=t_compute,
           step_s_memory=t_memory, step_s_roofline=max(t_compute, t_memory or 0.0),
           bound="memory" if t_memory is not None and t_memory > t_compute else "compute")
  hlo = compiled.as_text()
  r["collectives"] = collectives(hlo)
  # XLA's bytes count VMEM-resident operands and prefetches again (ovenc_jax/aot/hlo_traffic.py); this
  # second figure counts the arrays the program keeps in HBM, once.
  traffic = hlo_traffic.hbm_traffic(hlo)
  r.update(hbm_traffic_per_device=traffic["bytes"], hbm_traffic_largest=traffic["largest"],
           step_s_hbm_traffic=traffic["bytes"] / target.chip.hbm_bandwidth)
  if dump_dir:
    atomic_io.atomic_write(os.path.join(dump_dir, "train_step.hlo.txt"), lambda f: f.write(hlo), mode="w")
  if save_path:
    from jax.experimental import serialize_executable
    import pickle
    payload = serialize_executable.serialize(compiled)
    atomic_io.atomic_write(save_path, lambda f: pickle.dump(payload, f))
  return r


# ---- printing ------------------------------------------------------------------------------------

def _b(x) -> str:
  return "n/a" if x is None else f"{x / GiB:.2f} GiB" if x >= GiB else f"{x / 2 ** 20:.1f} MiB"


def _f(x) -> str:
  return "n/a" if x is None else f"{x:.3e}"


def _ms(x) -> str:
  return "n/a" if x is None else f"{x * 1e3:.1f} ms"


def format_report(r: dict) -> str:
  lines = [f"target        {r['topology']}: {r['num_devices']} x {r['device_kind']}",
           f"mesh          {r['mesh']}  global batch {r['global_batch']} rows x {r['tokens_per_row']} tokens, "
           f"{r['per_device_batch']} rows per device, compute {r['compute_dtype']}"]
  verdict = "FITS" if r["fits"] else "DOES NOT FIT"
  if "memory" in r:
    m = r["memory"]
    lines.append(f"memory/device arguments {_b(m['arguments'])}, outputs {_b(m['outputs'])}, aliased "
                 f"{_b(m['aliased'])}, temporaries {_b(m['temporaries'])}, code {_b(m['code'])}")
    lines.append(f"              total {_b(m['total'])} of {_b(r['hbm_bytes'])} HBM: {verdict}")
  else:
    lines.append(f"memory/device {verdict} in {_b(r['hbm_bytes'])} HBM; the compiler says:")
    lines.extend("  " + s for s in r["compiler_message"].strip().splitlines()[:20])
  lines.append(f"FLOPs/device  model {_f(r['model_flops_per_device'])}" +
               ("" if r.get("xla_flops_per_device") is None else
                f", XLA {_f(r['xla_flops_per_device'])} (difference, recompute and elementwise: "
                f"{_f(r['recompute_flops_per_device'])})"))
  if "step_s_roofline" in r:
    lines.append(f"bytes/device  {_b(r['bytes_accessed_per_device'])} accessed (XLA), "
                 f"{_b(r['hbm_traffic_per_device'])} to and from HBM ({_ms(r['step_s_hbm_traffic'])} at "
                 f"peak HBM bandwidth)")
    lines.append(f"step time     {_ms(r['step_s_compute'])} at peak compute ({r['peak_flops'] / 1e12:.0f} "
                 f"TFLOP/s), {_ms(r['step_s_memory'])} at peak HBM bandwidth "
                 f"({r['hbm_bandwidth'] / 1e9:.0f} GB/s): roofline {_ms(r['step_s_roofline'])}, {r['bound']}-bound")
    for name, nbytes in r["hbm_traffic_largest"][:5]:
      lines.append(f"  HBM {_b(nbytes):>11}  {name}")
    c = r["collectives"]
    lines.append("collectives   " + (", ".join(f"{k} {v['count']} ({_b(v['bytes'])})"
                                               for k, v in c["by_kind"].items()) or "none"))
    for op in c["largest"]:
      more = f" ... ({len(op['shapes'])} arrays)" if len(op["shapes"]) > 4 else ""
      lines.append(f"  {op['kind']:<19} {_b(op['bytes']):>11}  {' '.join(op['shapes'][:4])}{more}")
  for group, rows in r["shardings"]["tensors"].items():
    lines.append(f"shardings     {group}: {len(rows)} tensors, "
                 f"{_b(sum(t['bytes_per_device'] for t in rows.values()))} per device")
    by_spec = {}
    for key, t in rows.items():
      by_spec.setdefault(str(t["spec"]), []).append(key)
    for spec, keys in sorted(by_spec.items(), key=lambda kv: -len(kv[1])):
      lines.append(f"  {spec:<40} {len(keys):>4} tensors, e.g. {keys[0]}")
  for w in r["shardings"]["warnings"]:
    lines.append(f"WARNING       {w}")
  lines.append(f"compile time  {r['compile_s']:.1f} s")
  return "\n".join(lines)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "ovenc_jax/configs/pretrain.py:ARGS", lock_config=True)
  flags.DEFINE_string("topology", None, "v4-16, v5e-256, v5p-128, v6e-256, v5e:16x16, h100x8, "
                      "h100x8x2 (2 hosts), a100x8")
  flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN")
  flags.DEFINE_string("json", None, "write the figures here")
  flags.DEFINE_string("dump", None, "write the lowered and the optimised HLO into this folder")
  flags.DEFINE_string("save", None, "serialise the compiled executable (pickle) here")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  from absl import app, flags
  from ovenc_format import atomic_io
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  target = get_target(f.topology, f.num_slices)
  r = analyse(f.config, target, dump_dir=f.dump, save_path=f.save)
  print(format_report(r), flush=True)
  if f.json:
    atomic_io.save_json(f.json, r)
  sys.exit(0 if r["fits"] else 1)


def cli() -> None:
  """The `ovenc-aot` command (and `python -m ovenc_jax.aot.compile`)."""
  prepare_host_environment()
  from absl import flags
  from ovenc_jax import cli_errors
  _define_flags()
  cli_errors.define_verbose_flag()
  flags.declare_key_flag("verbose")  # listed by --help
  cli_errors.run(main, "ovenc-aot")


if __name__ == "__main__":
  cli()
