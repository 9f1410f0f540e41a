"""The trainer: sharded state, jit train step, metrics, kNN eval, orbax checkpoints with resume."""
import json
import logging
import os
import signal
import tempfile
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ovenc_format import paths as pathio
from ovenc_jax.train import checkpoint as ckpt_lib
from ovenc_jax.train import compat
from ovenc_jax.train import observability
from ovenc_jax.eval import embed as embed_lib
from ovenc_jax.eval import in_training as in_training_eval
from ovenc_jax.input import features as input_features
from ovenc_jax.input import global_arrays
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.loss import banks as loss_lib
from ovenc_jax.loss import defaults as loss_defaults
from ovenc_jax.model import encoder as model_lib
from ovenc_jax.train import optim
from ovenc_jax import sharding as sharding_lib

log = logging.getLogger("ovenc_jax.train.trainer")


# Metrics that are counts: summed over microbatches; the others are means weighted by loss_count.
SUMMED_METRICS = ("loss_count", "num_valid_labels", "labels_out_of_range", "valid_labels")


class NonFiniteLossError(RuntimeError):
  pass


def resolve_num_classes(config):
  """loss.num_classes from input.label_table's class count when unset (0); an error when they differ.

  With loss.heads each bank's num_classes is checked against its own table (or input.label_table)."""
  path = config.input.label_table
  specs = loss_lib.bank_specs(config.loss)
  if specs is not None:
    for i, spec in enumerate(specs):
      table = spec.label_table or path
      n = input_features.load_label_table(table).num_classes if table else None
      if n is not None and n != int(spec.cfg.num_classes):
        raise ValueError(f"loss.heads[{i}].num_classes={spec.cfg.num_classes} != the {n} classes of "
                         f"its label table {table}")
    return config
  if not path:
    if not config.loss.num_classes:
      raise ValueError("loss.num_classes is unset (0) and there is no input.label_table to take it from")
    return config
  n = input_features.load_label_table(path).num_classes
  if not config.loss.num_classes:
    config = config.copy_and_resolve_references()
    config.loss.num_classes = n
  elif int(config.loss.num_classes) != n:
    raise ValueError(f"loss.num_classes={config.loss.num_classes} != the {n} classes of "
                     f"input.label_table={path}")
  return config


def validate_config(config) -> None:
  """Cross-section checks; each section validates its own keys too."""
  for key in ("total_steps", "log_every", "ckpt_every", "max_bad_steps"):
    if int(config[key]) <= 0:
      raise ValueError(f"config.{key}={config[key]} must be a positive integer")
  if config.model.patch_size != config.input.patch_size:
    raise ValueError(f"model.patch_size={config.model.patch_size} != input.patch_size="
                     f"{config.input.patch_size}: the encoder would read patches of the wrong size")
  if config.eval_every < 0:
    raise ValueError(f"config.eval_every={config.eval_every} must be >= 0 (0 = only at start and end)")
  if config.input.global_batch_size % config.optim.grad_accum_steps:
    raise ValueError(f"input.global_batch_size={config.input.global_batch_size} is not divisible by "
                     f"optim.grad_accum_steps={config.optim.grad_accum_steps}")
  optim.validate(config.optim, config.total_steps)
  observability.parse_profile_steps(config.get("profile_steps", ""))
  observability.wandb_module(config)


class Trainer:
  """Owns the mesh, the jitted step and the state layout; `run()` is the loop."""

  def __init__(self, config, workdir: str, devices=None):
    config = resolve_num_classes(config)
    validate_config(config)
    self.config, self.workdir = config, workdir
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    sharding_lib.validate_divisibility(config.model, self.mesh)
    self.rules = tuple(tuple(r) for r in config.logical_axis_rules)
    # The mesh axes of the "batch" and "classes" logical axes: the input rows, the loss's gathers and
    # the centers' rows are split over these.
    self.batch_axes = sharding_lib.logical_mesh_axes(self.rules, "batch")
    self.class_axes = sharding_lib.logical_mesh_axes(self.rules, "classes")
    batch_shards = int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))
    if config.input.global_batch_size % batch_shards:
      raise ValueError(f"input.global_batch_size={config.input.global_batch_size} is not divisible by "
                       f"{'*'.join('mesh.' + a for a in self.batch_axes)}={batch_shards}")
    self.encoder = model_lib.encoder_from_config(config.model, self.rules,
                                                 platform=self.mesh.devices.flat[0].platform)
    # The train step's rows are one sample each without packing or with one segment a row; the same
    # parameters, and the attention may take sequence lengths for them (model.attention.cudnn).
    self.train_encoder = self.encoder.clone(
        one_sample_rows=not config.input.pack or int(config.input.max_segments) == 1)
    # Center rows are padded to a multiple of loss.center_row_multiple (128 by default) and of the
    # shard count, so one checkpoint restores onto any mesh of up to that many devices (powers of
    # two) without reshaping the centers.
    self.num_shards = int(np.lcm(int(np.prod([self.mesh.shape[a] for a in self.class_axes])),
                                 int(loss_defaults.option(config.loss, "center_row_multiple"))))
    self.loss_fn = loss_lib.loss_fn_from_config(self.mesh, config.loss, self.batch_axes, self.class_axes)
    self.tx = optim.make_optimizer(config.optim, config.loss, config.total_steps,
                                   class_shards=int(np.prod([self.mesh.shape[a] for a in self.class_axes])))
    self.lr_schedule = optim.schedule(config.optim, config.total_steps)
    i = config.input
    self.example = dict(
        patches=jnp.zeros((1, i.tokens_per_row, i.patch_size ** 2 * 3), jnp.uint8),
        positions=jnp.zeros((1, i.tokens_per_row, 3), jnp.int32),
        segment_ids=jnp.ones((1, i.tokens_per_row), jnp.int32))
    with jax.set_mesh(self.mesh):
      # The key is made inside the trace: nothing may run eagerly on the mesh, whose devices can be
      # compile-only (ovenc_jax.aot.compile).
      abstract = jax.eval_shape(lambda: self._init_state(jax.random.key(0)))
      self.state_shardings = nn.meta.unbox(sharding_lib.logical_shardings(abstract, self.mesh, self.rules))
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(abstract),
        self.state_shardings)
    self._step_fn = jax.jit(self._train_step, in_shardings=(self.state_shardings, None),
                            out_shardings=(self.state_shardings, None), donate_argnums=(0,))
    self._embed_fn = jax.jit(self._embed)
    self._evaluator = in_training_eval.Evaluator(self.encoder, config, self.mesh, self.batch_axes)

  # ---- state -------------------------------------------------------------------------------
  def _init_params(self, rng):
    r_enc, r_cls = jax.random.split(rng)
    enc = self.encoder.init(r_enc, **self.example)["params"]
    # One array, or one per bank of loss.heads.
    centers = loss_lib.init_centers_from_config(r_cls, self.config.loss, self.config.model.width, self.num_shards)
    return {"encoder": enc, "centers": jax.tree.map(lambda c: nn.LogicallyPartitioned(c, ("classes", None)),
                                                    centers)}

  def _init_state(self, rng):
    params = self._init_params(rng)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
            "rng": jax.random.key_data(jax.random.fold_in(rng, 1))}

  def init_state(self, seed: int):
    with jax.set_mesh(self.mesh):
      boxed = jax.jit(self._init_state, out_shardings=self.state_shardings)(jax.random.key(seed))
    return nn.meta.unbox(boxed)

  def state_from_params(self, params, seed: int):
    """Fresh optimizer state around given params (fine-tuning from an imported checkpoint)."""
    state = self.init_state(seed)
    enc_shardings = self.state_shardings["params"]["encoder"]
    state["params"]["encoder"] = jax.tree.map(
        lambda x, s: jax.device_put(np.asarray(x), s), params["encoder"], enc_shardings)
    if "centers" in params:
      put = lambda x, s: jax.device_put(np.asarray(x), s)
      fresh, shardings = state["params"]["centers"], self.state_shardings["params"]["centers"]
      if isinstance(fresh, dict):  # banks init_from lacks (a stage adding a head) start fresh
        state["params"]["centers"] = {k: jax.tree.map(put, params["centers"][k], shardings[k])
                                      if k in params["centers"] else v for k, v in fresh.items()}
      else:
        state["params"]["centers"] = jax.tree.map(put, params["centers"], shardings)
    with jax.set_mesh(self.mesh):
      state["opt_state"] = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(
          state["params"])
    return state

  # ---- step --------------------------------------------------------------------------------
  def _loss(self, params, batch, rng):
    s = self.config.input.max_segments
    out = self.train_encoder.apply({"params": params["encoder"]}, batch["patches"], batch["positions"],
                             batch["segment_ids"], num_segments=s)
    emb = out["pooled"].astype(jnp.float32)
    emb = emb.reshape(-1, emb.shape[-1])
    labels = batch["labels"].reshape(emb.shape[0], -1)
    loss, metrics = self.loss_fn(emb, params["centers"], labels, rng)
    return loss, metrics

  def _loss_and_grads(self, params, batch, rng):
    """(loss, metrics, grads) of the whole batch, also under gradient accumulation.

    Each microbatch's loss, gradients and mean metrics are weighted by its loss_count (the number of
    terms its loss averages) and the sums divided once by the total: with packing, microbatches hold
    different numbers of labels, and a mean of their means is not the full batch's mean.
    """
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    accum = int(self.config.optim.grad_accum_steps)
    if accum == 1:
      (loss, aux), grads = grad_fn(params, batch, rng)
      return loss, aux, grads
    # Microbatch i takes rows i, i+accum, ... so every microbatch spans all data shards.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

    def weigh(aux, w):
      return {k: v if k in SUMMED_METRICS else v * w for k, v in aux.items()}

    def body(carry, xs):
      mb, idx = xs
      (l, a), g = grad_fn(params, mb, jax.random.fold_in(rng, idx))
      w = a["loss_count"]
      return jax.tree.map(jnp.add, carry, (l * w, weigh(a, w), jax.tree.map(lambda x: x * w, g))), None

    (l0, a0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
    (loss, aux, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    inv = 1.0 / jnp.maximum(aux["loss_count"], 1.0)
    return loss * inv, weigh(aux, inv), jax.tree.map(lambda x: x * inv, grads)

  def _train_step(self, state, batch):
    batch = dict(batch)
    stop = batch.pop("stop", None)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    loss, aux, grads = self._loss_and_grads(state["params"], batch, rng)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # A step with a non-finite loss or gradient is not applied (a finite loss can hide NaN
    # gradients): params and optimizer state stay as they were, so no NaN can reach a checkpoint.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
    labels, num_classes = batch["labels"], loss_lib.label_space_size(self.config.loss)
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, lr=self.lr_schedule(state["step"]),
                   tokens=jnp.sum(batch["segment_ids"] > 0), samples=jnp.sum(batch["sample_id"] >= 0),
                   skipped_step=1.0 - ok.astype(jnp.float32),
                   valid_labels=jnp.sum((labels >= 0) & (labels < num_classes)).astype(jnp.float32),
                   labels_out_of_range=jnp.sum((labels < -1) | (labels >= num_classes)).astype(jnp.float32))
    if stop is not None:
      # Any process's stop request, seen identically by all: they agree on the step to stop at.
      metrics["stop"] = jnp.max(stop)
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def train_step(self, state, host_batch, stop: bool | None = None):
    """Dispatches one step (returns at once). With `stop`, this process's stop request rides along
    and metrics["stop"] is the OR over all processes."""
    if stop is not None:
      rows = next(iter(host_batch.values())).shape[0]
      host_batch = dict(host_batch, stop=np.full((rows,), int(stop), np.int32))
    batch = global_arrays.global_batch(host_batch, self.mesh, self.batch_axes)
    with jax.set_mesh(self.mesh):
      return self._step_fn(state, batch)

  def step_flops(self, host_batch) -> float:
    """XLA's FLOP count of one compiled train step (forward, backward, update) at this batch's shapes;
    per device on a multi-device mesh."""
    batch = global_arrays.global_batch(host_batch, self.mesh, self.batch_axes)
    with jax.set_mesh(self.mesh):
      cost = self._step_fn.lower(self.abstract_state, batch).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  # ---- eval --------------------------------------------------------------------------------
  def _embed(self, enc_params, batch):
    out = self.encoder.apply({"params": enc_params}, batch["patches"], batch["positions"], batch["segment_ids"])
    return out["pooled"][:, 0]

  def embed(self, enc_params, batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    embs, labels, ids = [], [], []
    for host_batch in batches:
      batch = global_arrays.global_batch(host_batch, self.mesh, self.batch_axes)
      with jax.set_mesh(self.mesh):
        e = self._embed_fn(enc_params, batch)
      e = np.asarray(multihost_utils.process_allgather(e, tiled=True))
      sid = np.asarray(multihost_utils.process_allgather(batch["sample_id"], tiled=True))[:, 0]
      lab = np.asarray(multihost_utils.process_allgather(batch["class_label"], tiled=True))[:, 0]
      keep = sid >= 0
      embs.append(e[keep]), labels.append(lab[keep]), ids.append(sid[keep])
    return np.concatenate(embs), np.concatenate(labels), np.concatenate(ids)

  def evaluate(self, enc_params) -> dict[str, float]:
    return self._evaluator(enc_params)

  # ---- ahead-of-time compile (ovenc_jax.aot.compile) ---------------------------------------------------
  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, dtypes and shardings as the input config produces it."""
    i = self.config.input
    b, n, s = int(i.global_batch_size), int(i.tokens_per_row), int(i.max_segments)
    sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.batch_axes))
    shapes = dict(patches=((b, n, i.patch_size ** 2 * 3), jnp.uint8), positions=((b, n, 3), jnp.int32),
                  segment_ids=((b, n), jnp.int32), labels=((b, s, int(i.max_labels)), jnp.int32),
                  class_label=((b, s), jnp.int32),
                  sample_id=((b, s), jnp.int64 if jax.config.jax_enable_x64 else jnp.int32))
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}

  def lower(self, batch=None) -> jax.stages.Lowered:
    """The jitted train step lowered against the abstract state and `batch` (default: abstract_batch())."""
    with jax.set_mesh(self.mesh):
      return self._step_fn.lower(self.abstract_state, self.abstract_batch() if batch is None else batch)

  # ---- loop --------------------------------------------------------------------------------
  def run(self) -> dict[str, Any]:
    c = self.config
    # Everything that can refuse the run is checked before the workdir is touched: a checkpoint or
    # init_from of another model, then the data.
    init_params = None
    resume_step = ckpt_lib.latest_step(self.workdir)
    if resume_step is not None:
      compat.check_resume(self.workdir, resume_step, self.abstract_state, c.model)
    elif c.init_from:
      init_params = compat.load_init_params(c.init_from, self.abstract_state["params"], c.model)
    data_iter = input_pipeline.make_train_iterator(c.input, banks=loss_lib.source_banks(c.loss))
    pathio.makedirs(self.workdir)
    mngr = ckpt_lib.make_manager(self.workdir, max_to_keep=c.keep_ckpts,
                                 save_interval_steps=c.ckpt_every, async_save=c.async_ckpt)
    try:
      state, start = self._restore_or_init(mngr, data_iter, init_params)
    except BaseException:
      mngr.close()
      raise
    # Only now: the workdir's config.json always describes the model its checkpoints hold.
    if jax.process_index() == 0:
      embed_lib.save_config(self.workdir, c)
    writer = MetricsWriter(self.workdir, enabled=jax.process_index() == 0, config=c)
    monitor = observability.RunMonitor(self, self.workdir)
    sigterm = {"seen": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: sigterm.__setitem__("seen", True))
    summary: dict[str, Any] = {"start_step": start}
    try:
      if start == 0:
        summary["initial_eval"] = self._log_eval(writer, state, start)
      log_state = _LogState(mngr.latest_step)
      window: list[tuple[int, Any]] = []  # (step, device metrics) not fetched yet
      step, previous_metrics, stopping, t_start = start, None, False, None
      while step < c.total_steps:
        monitor.before_step(step + 1)
        state, metrics = self.train_step(state, monitor.next_batch(data_iter), stop=sigterm["seen"])
        step += 1
        window.append((step, metrics))
        # Two steps in flight at most: waiting for step N-1 after dispatching step N keeps the
        # device busy and avoids XLA's CPU collective rendezvous hang with many queued steps.
        if previous_metrics is not None:
          jax.block_until_ready(previous_metrics)
          # Step N-1's stop flag is the OR over processes: every process stops after step N.
          stopping = bool(previous_metrics["stop"])
        previous_metrics = metrics
        last = step == c.total_steps or stopping
        monitor.after_step(step, metrics, last)
        if c.fetch_metrics_every_step or step == start + 1 or step % c.log_every == 0 or last:
          self._fetch(window, log_state, writer, first_step=start + 1)
          window = []
        if step % c.log_every == 0 or last:
          self._log_window(step, log_state, writer, summary, input_pipeline.skipped_records(data_iter), monitor)
        if last:
          now = time.perf_counter()
          summary["steps_per_s"] = (step - start - 1) / max(now - (t_start or now), 1e-9)
        self._save(mngr, step, state, data_iter, force=last)
        if step == start + 1:
          # Timed from here: after compilation and after orbax's initial save (its save policy always
          # checkpoints the first step, and that save blocks).
          t_start = time.perf_counter()
        if c.eval_every and step % c.eval_every == 0 and step != c.total_steps:
          self._log_eval(writer, state, step)
        if stopping and step < c.total_steps:
          log.warning("SIGTERM (here: %s): all processes saved step %d to %s; exiting for preemption",
                      sigterm["seen"], step, self.workdir)
          summary["preempted_at"] = step
          break
      else:
        summary["final_eval"] = self._log_eval(writer, state, step)
      summary.update(final_step=step, final_loss=log_state.loss, skipped_steps=log_state.bad_total)
    finally:
      monitor.close()
      mngr.wait_until_finished()
      mngr.close()
      writer.close()
      signal.signal(signal.SIGTERM, previous)
    self.state = state
    return summary

  def _fetch(self, window, log_state, writer, first_step):
    """One host transfer for a window of steps: per-step losses, label and non-finite checks."""
    c = self.config
    for step, m in zip([s for s, _ in window], jax.device_get([m for _, m in window])):
      loss = float(m["loss"])
      if step == first_step and m["valid_labels"] == 0:
        raise ValueError(
            f"step {step}: the batch holds no valid label (every label is -1), so the loss and its "
            f"gradients are 0. Shards from data_prep.codec_patchify carry no labels: set "
            f"input.label_table to the cluster label table (ovenc_format.label_table).")
      if m["labels_out_of_range"]:
        n = loss_lib.label_space_size(c.loss)
        space = (f"{n}) (the loss.heads banks' num_classes added up" if c.loss.get("heads")
                 else f"loss.num_classes={n}")
        raise ValueError(
            f"step {step}: {int(m['labels_out_of_range'])} label(s) outside [0, {space}): the classes "
            f"do not match the labels of input.sources / input.label_table")
      log_state.add(step, m, loss, c.max_bad_steps)
      writer.step_loss(step, loss)

  def _log_window(self, step, log_state, writer, summary, skipped_records, monitor=None):
    c = self.config
    dt = time.perf_counter() - log_state.t_last
    scalars = {k: float(v) for k, v in log_state.metrics.items() if k not in ("tokens", "samples", "stop")}
    # The mean over the window: one step's loss is noisy (labels and negatives are sampled).
    scalars.update(tokens_per_s=log_state.tokens / dt, samples_per_s=log_state.samples / dt,
                   loss_window_mean=float(np.mean(log_state.window)), skipped_steps=log_state.bad_total,
                   input_skipped_records=skipped_records)
    perf = {} if monitor is None else monitor.window(steps=len(log_state.window), seconds=dt,
                                                     tokens=log_state.tokens, step=step)
    scalars.update({f"perf/{k}": v for k, v in perf.items()})
    writer.scalars(step, scalars)
    log.info("step %d/%d loss %.4f (mean of last %d: %.4f) lr %.2e grad_norm %.3f %.0f tokens/s "
             "%.1f samples/s%s", step, c.total_steps, log_state.loss, len(log_state.window),
             scalars["loss_window_mean"], scalars["lr"], scalars["grad_norm"], scalars["tokens_per_s"],
             scalars["samples_per_s"], "; " + observability.describe(perf) if perf else "")
    summary.setdefault("first_window_mean_loss", scalars["loss_window_mean"])
    summary["last_window_mean_loss"] = scalars["loss_window_mean"]
    log_state.reset()

  def _log_eval(self, writer, state, step):
    result = self.evaluate(state["params"]["encoder"])
    if result:
      writer.scalars(step, {f"eval/{k}": v for k, v in result.items()})
      log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result

  def _save(self, mngr, step, state, data_iter, force=False):
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              ds=grain.checkpoint.CheckpointSave(data_iter))
    mngr.save(step, args=args, force=force)

  def _restore_or_init(self, mngr, data_iter, init_params=None):
    """Restores the latest checkpoint, else a fresh state (around `init_params`, init_from's checked
    params, when given)."""
    c = self.config
    step = mngr.latest_step()
    if step is None:
      if init_params is not None:
        log.info("initialising params from %s", c.init_from)
        return self.state_from_params(init_params, c.seed), 0
      return self.init_state(c.seed), 0
    log.info("resuming from %s step %d", ckpt_lib.checkpoint_dir(self.workdir), step)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self.abstract_state),
        ds=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"], int(step)


class _LogState:
  """Host-side running values between log steps, and the run of consecutive skipped steps."""

  def __init__(self, latest_step):
    self.latest_step, self.bad_run, self.bad_total, self.loss = latest_step, 0, 0, None
    self.reset()

  def reset(self):
    self.t_last, self.tokens, self.samples, self.window, self.metrics = time.perf_counter(), 0, 0, [], {}

  def add(self, step, m, loss, max_bad_steps):
    self.loss, self.metrics = loss, m
    self.tokens += int(m["tokens"])
    self.samples += int(m["samples"])
    self.window.append(loss)
    if not m["skipped_step"]:
      self.bad_run = 0
      return
    self.bad_run += 1
    self.bad_total += 1
    log.warning("step %d: non-finite loss %s or gradient norm %s; the update was not applied (%d in a row)",
                step, loss, float(m["grad_norm"]), self.bad_run)
    if self.bad_run >= max_bad_steps:
      raise NonFiniteLossError(
          f"non-finite loss or gradient norm (loss {loss}) at step {step}, {self.bad_run} steps in a "
          f"row (max_bad_steps={max_bad_steps}); stopping. None of these updates was applied or "
          f"saved; the last checkpoint is step {self.latest_step()}.")


class MetricsWriter:
  """TensorBoard events plus metrics.jsonl (one line per logged step) in the workdir.

  tensorboardX writes gs:// event files itself (google-cloud-storage). Object stores cannot append:
  with a remote workdir metrics.jsonl is kept in a local copy (the bucket's, when resuming) and
  uploaded whole at each scalars() call and at close()."""

  def __init__(self, workdir: str, enabled: bool = True, config=None):
    self.enabled, self.wandb = enabled, None
    if not enabled:
      return
    if config is not None:
      self.wandb = observability.start_wandb(config, workdir)
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
    self.tb = SummaryWriter(pathio.join(workdir, "tensorboard"))
    self.remote = pathio.join(workdir, "metrics.jsonl") if pathio.is_remote(workdir) else None
    local = os.path.join(workdir, "metrics.jsonl")
    if self.remote:
      self._tmp = tempfile.TemporaryDirectory(prefix="ovenc-metrics-")
      local = os.path.join(self._tmp.name, "metrics.jsonl")
      if pathio.exists(self.remote):
        pathio.download(self.remote, local)
    self.jsonl = open(local, "a")

  def step_loss(self, step, loss):
    if self.enabled:
      self.jsonl.write(json.dumps({"step": step, "loss": loss}) + "\n")
      self.jsonl.flush()

  def scalars(self, step, scalars):
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    if self.wandb is not None:
      self.wandb.log(scalars, step=step)
    self.jsonl.write(json.dumps(dict(scalars, step=step)) + "\n")
    self.jsonl.flush()
    self._sync()

  def _sync(self):
    if self.remote:
      pathio.upload(self.jsonl.name, self.remote)

  def close(self):
    if self.enabled:
      self.tb.close()
      self.jsonl.close()
      self._sync()
      if self.remote:
        self._tmp.cleanup()
      if self.wandb is not None:
        self.wandb.finish()
