"""Run observability: model FLOPs, MFU against chip peaks, step-time split, ETA, memory, profiles, W&B."""
import logging
import math
import os
import time

log = logging.getLogger("ovenc_jax.train.observability")

# Dense bf16 peak FLOP/s per device (datasheet, no sparsity), matched against jax's device_kind with
# spaces, dashes and case dropped; the first matching entry wins, so the longer names come first.
# On TPU v4 and v5p a jax device is one chip (megacore), on v5e and v6e one chip; GPUs are SXM parts.
PEAK_BF16_FLOPS = (
    ("tpuv5lite", 197e12), ("tpuv5e", 197e12), ("tpuv5p", 459e12), ("tpuv5", 459e12),
    ("tpuv6lite", 918e12), ("tpuv6e", 918e12), ("tpuv4", 275e12),
    ("a100", 312e12), ("h100", 989e12), ("h200", 989e12), ("b200", 2250e12),
)
# A nominal host-CPU device peak: no datasheet figure exists for a host device (a share of cores),
# so it is named here only so that benchmarks print MFU fields on every machine.
CPU_NOMINAL_PEAK_FLOPS = 100e9


def peak_flops(device_kind: str) -> float | None:
  """The bf16 peak of one device of this kind; None for an unknown kind (then TFLOP/s only)."""
  key = "".join(ch for ch in device_kind.lower() if ch.isalnum())
  for name, peak in PEAK_BF16_FLOPS:
    if name in key:
      return peak
  return None


def model_flops(config, class_shards: int, padded_classes: int, tensor: int = 1) -> dict[str, float]:
  """Matmul FLOPs of one train step over all devices (fwd + bwd, no recompute).

  Backward costs twice the forward (grads of both operands), so training is 3x the forward, except
  for the patch embedding, whose input (pixels) needs no gradient. Elementwise work (norms, GELU,
  softmax) is not counted. The patch embedding has no tensor-parallel axis, so each of the `tensor`
  ranks of a batch shard repeats it.
  """
  i, m, lc = config.input, config.model, config.loss
  b, n, s = int(i.global_batch_size), int(i.tokens_per_row), int(i.max_segments)
  d, f, depth, p = int(m.width), int(m.mlp_dim), int(m.depth), int(i.patch_size) ** 2 * 3
  patch = 2 * b * n * p * d
  layers = depth * (2 * b * n * (4 * d * d + 2 * d * f) + 4 * b * n * n * d)
  # The probe head as Attention._pool computes it: per query the q and output projections, the query
  # mapped into x's space and the values pooled there (d x d each), scores and pooling over the row
  # in x's space for each of the h heads, then the MLP.
  h = int(m.num_heads)
  head = 2 * b * (4 * s * d * d + 2 * s * n * d * h + 2 * s * d * f)
  # The loss: each of the class shards scores all B*S embeddings against its columns of the centers.
  # The column count is loss.make_loss_fn's own: all local rows, or the static Partial-FC selection
  # (loss.partial_fc.selection_size); the official recipe draws one selection per label slot.
  from ovenc_jax.loss import partial_fc
  e = b * s
  c_local = padded_classes // class_shards
  k = min(int(lc.labels_per_step), int(i.max_labels))
  official = lc.get("recipe", "default") == "official"
  _, n_sel = partial_fc.selection_size(c_local, lc.sample_rate, e if official else e * k, class_shards,
                                       lc.get("pfc_positive_slack", 2.0))
  cols = (c_local if n_sel is None else n_sel) * (k if official else 1)
  loss = 3 * class_shards * 2 * e * d * cols
  out = dict(patch_embed=2 * patch * tensor, encoder_layers=3 * layers, head=3 * head, loss=loss)
  out["total"] = sum(out.values())
  return out


def trainer_step_flops(trainer) -> float:
  """model_flops' total for the trainer's config and mesh, per device; with loss.heads each bank's
  loss term at its own centers."""
  from ovenc_jax.loss import banks
  c, mesh = trainer.config, dict(trainer.mesh.shape)
  shards = math.prod(mesh[a] for a in trainer.class_axes)
  centers = trainer.abstract_state["params"]["centers"]
  specs = banks.bank_specs(c.loss)
  if specs is None:
    total = model_flops(c, shards, centers.shape[0], mesh["tensor"])["total"]
  else:
    total = 0.0
    for j, spec in enumerate(specs):
      cfg = c.copy_and_resolve_references()
      cfg.loss = spec.cfg
      parts = model_flops(cfg, shards, centers[spec.name].shape[0], mesh["tensor"])
      total += parts["loss"] + (parts["total"] - parts["loss"] if j == 0 else 0.0)
  return total / trainer.mesh.size


def parse_profile_steps(value) -> tuple[int, int] | None:
  """config.profile_steps "start,count" -> (start, count); "" -> None."""
  if value in ("", None):
    return None
  parts = str(value).split(",")
  try:
    start, count = (int(p) for p in parts)
  except ValueError:
    start = count = -1
  if len(parts) != 2 or start < 1 or count < 1:
    raise ValueError(f"config.profile_steps={value!r} must be 'start,count' with start >= 1 and count >= 1 "
                     f"(e.g. 10,5: trace steps 10 to 14)")
  return start, count


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  h, rem = divmod(s, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def window_figures(*, steps: int, seconds: float, host_wait_s: float, tokens: float, step: int,
                   total_steps: int, num_devices: int, flops_per_step_per_device: float | None,
                   peak: float | None, peak_memory_bytes: int | None = None) -> dict[str, float]:
  """One log window's figures. tokens: real (non-padding) tokens over all devices; FLOPs are the
  model's at the padded shapes, which the devices compute."""
  seconds = max(seconds, 1e-9)
  rate = steps / seconds
  out = dict(tokens_per_s_per_device=tokens / seconds / num_devices, step_time_s=seconds / max(steps, 1),
             host_wait_s=host_wait_s / max(steps, 1), eta_s=(total_steps - step) / rate if rate else math.inf)
  out["device_time_s"] = out["step_time_s"] - out["host_wait_s"]
  if flops_per_step_per_device:
    out["model_tflops_per_device"] = flops_per_step_per_device * rate / 1e12
    if peak:
      out["mfu"] = flops_per_step_per_device * rate / peak
  if peak_memory_bytes is not None:
    out["peak_memory_gib"] = peak_memory_bytes / 2 ** 30
  return out


def peak_memory_bytes(devices) -> int | None:
  """The largest peak_bytes_in_use over these devices; None where the backend reports none (CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats raise instead of returning None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


class RunMonitor:
  """The trainer loop's hooks: timed input reads, the profiler window, and each log window's figures."""

  def __init__(self, trainer, workdir: str, clock=time.perf_counter):
    import jax
    c = trainer.config
    self.clock, self.total_steps = clock, int(c.total_steps)
    self.devices = list(trainer.mesh.devices.flat)
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.flops = trainer_step_flops(trainer)
    self.peak = peak_flops(self.devices[0].device_kind)
    self.profile = parse_profile_steps(c.get("profile_steps", ""))
    self.trace_dir = os.path.join(workdir, "tensorboard")
    self.tracing = False
    self.host_wait = 0.0

  def next_batch(self, data_iter):
    t = self.clock()
    batch = next(data_iter)
    self.host_wait += self.clock() - t
    return batch

  def before_step(self, step: int) -> None:
    """Called before dispatching step `step` (1-based)."""
    if self.profile and step == self.profile[0] and not self.tracing:
      import jax
      log.info("profiling steps %d-%d into %s", step, step + self.profile[1] - 1, self.trace_dir)
      jax.profiler.start_trace(self.trace_dir)
      self.tracing = True

  def after_step(self, step: int, outputs, last: bool) -> None:
    """Called after dispatching step `step`: the trace ends once its last step has run."""
    if self.tracing and (step == sum(self.profile) - 1 or last):
      import jax
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.tracing = False

  def close(self) -> None:
    if self.tracing:
      import jax
      jax.profiler.stop_trace()
      self.tracing = False

  def window(self, *, steps: int, seconds: float, tokens: float, step: int) -> dict[str, float]:
    out = window_figures(steps=steps, seconds=seconds, host_wait_s=self.host_wait, tokens=tokens, step=step,
                         total_steps=self.total_steps, num_devices=len(self.devices),
                         flops_per_step_per_device=self.flops, peak=self.peak,
                         peak_memory_bytes=peak_memory_bytes(self.local_devices))
    self.host_wait = 0.0
    return out


def describe(f: dict) -> str:
  """The console line's part for window_figures' output."""
  parts = [f"{f['tokens_per_s_per_device']:.0f} tokens/s/device"]
  if "model_tflops_per_device" in f:
    parts.append(f"{f['model_tflops_per_device']:.2f} TFLOP/s/device")
  if "mfu" in f:
    parts.append(f"MFU {100 * f['mfu']:.1f}%")
  parts.append(f"step {1e3 * f['step_time_s']:.1f} ms (input wait {1e3 * f['host_wait_s']:.1f} ms)")
  if "peak_memory_gib" in f:
    parts.append(f"peak mem {f['peak_memory_gib']:.2f} GiB")
  parts.append(f"ETA {format_eta(f['eta_s'])}")
  return ", ".join(parts)


def wandb_module(config):
  """The wandb module when config.wandb.project is set (None otherwise); a clear error when it is missing."""
  w = config.get("wandb")
  if not w or not w.get("project"):
    return None
  try:
    import wandb
  except ImportError:
    raise RuntimeError(f"config.wandb.project={w.project!r} is set but the wandb package is not installed: "
                       f"pip install 'ovenc-jax[wandb]' (or leave config.wandb.project empty)") from None
  return wandb


def start_wandb(config, workdir: str):
  """A wandb run logging this run's scalars when config.wandb.project is set, else None."""
  wandb = wandb_module(config)
  if wandb is None:
    return None
  w = config.wandb
  return wandb.init(project=w.project, entity=w.get("entity") or None,
                    name=w.get("name") or os.path.basename(os.path.abspath(workdir)),
                    dir=workdir, config=config.to_dict(), resume="allow")
