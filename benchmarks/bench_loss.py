"""Sharded loss vs a bare sharded matmul (center memory per device, step time), and Partial FC vs dense at a large batch."""
import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ovenc_jax import sharding
from ovenc_jax.loss import centers as centers_lib
from ovenc_jax.loss import discrimination as loss_lib
from ovenc_jax.loss import partial_fc
from ovenc_jax.loss.defaults import default_loss_config

BATCH_AXES = ("data", "fsdp")
CLASS_AXES = ("data", "fsdp", "tensor")


def _label(c):
  return f"{c // 1_000_000}m" if c % 1_000_000 == 0 else f"{c // 1000}k" if c % 1000 == 0 else str(c)


def _matmul_step(mesh):
  """Same shard_map layout as the loss (gather batch, local [B, C/n] logits), with 0.5*sum(logits^2)
  as the objective so the backward pass is the two real matmuls and nothing else."""
  def local(e, c):
    e = jax.lax.all_gather(e, BATCH_AXES, axis=0, tiled=True)
    logits = e @ c.T
    return jax.lax.psum(0.5 * jnp.sum(logits * logits), CLASS_AXES)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(BATCH_AXES, None), P(CLASS_AXES, None)),
                     out_specs=P())
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))


def _loss_step(mesh, num_classes, sample_rate):
  cfg = default_loss_config()
  cfg.num_classes = num_classes
  cfg.sample_rate = sample_rate
  fn = loss_lib.make_loss_fn(mesh, cfg, BATCH_AXES, CLASS_AXES)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))


def _time(steps, iters):
  """Median wall time of each (step, args); steps run interleaved so that load from other processes
  hits all of them alike. Blocks on every step (host-device collectives deadlock when queued)."""
  times = [[] for _ in steps]
  for i in range(iters + 2):
    for j, (step, args) in enumerate(steps):
      t = time.perf_counter()
      jax.block_until_ready(step(*args))
      if i >= 2:
        times[j].append(time.perf_counter() - t)
  return [float(np.median(t)) for t in times], times


def _class_mesh():
  """Every device on the data axis: the centers shard over all of them, as in training."""
  devices = np.array(jax.devices())
  return Mesh(devices.reshape(devices.size, 1, 1), ("data", "fsdp", "tensor"))


def _problem(mesh, c, dim, batch, labels_per_sample):
  """(embeddings, labels, centers, key) of one benchmark case, sharded like the trainer's."""
  rng = np.random.default_rng(0)
  emb = jax.device_put(rng.normal(size=(batch, dim)).astype(np.float32),
                       NamedSharding(mesh, P(BATCH_AXES, None)))
  labels = jax.device_put(rng.integers(0, c, (batch, labels_per_sample)).astype(np.int32),
                          NamedSharding(mesh, P(BATCH_AXES, None)))
  centers = centers_lib.init_centers(jax.random.key(0), c, dim, mesh.size,
                                     sharding=centers_lib.centers_sharding(mesh, CLASS_AXES))
  return emb, labels, centers, jax.random.key(1)


def run(classes, dim, batch, labels_per_sample, iters, pfc_rate):
  mesh = _class_mesh()
  n = mesh.size
  rows = []
  for c in classes:
    c_pad = centers_lib.padded_num_classes(c, n)
    emb, labels, centers, key = _problem(mesh, c, dim, batch, labels_per_sample)
    loss_step = _loss_step(mesh, c, 1.0)
    compiled = loss_step.lower(emb, centers, labels, key).compile()
    mem = compiled.memory_analysis()
    other_in = (batch // n) * dim * 4 + (batch // n) * labels_per_sample * 4 + 8
    other_out = (batch // n) * dim * 4
    # Arguments hold this device's centers rows; outputs its center-gradient rows (plus small
    # batch-sized leftovers, counted separately and subtracted).
    centers_grads = mem.argument_size_in_bytes + mem.output_size_in_bytes - other_in - other_out
    unsharded = 2 * c * dim * 4
    mm = _matmul_step(mesh)
    mm(emb, centers)  # compile outside the timing
    pfc_step = _loss_step(mesh, c, pfc_rate)
    (t_loss, t_mm, t_pfc), raw = _time([(loss_step, (emb, centers, labels, key)), (mm, (emb, centers)),
                                 (pfc_step, (emb, centers, labels, key))], iters)
    rows.append(dict(
        classes=c, padded=c_pad, dim=dim, batch=batch,
        bytes_centers_grads_per_device=int(centers_grads), bytes_unsharded=int(unsharded),
        memory_fraction=centers_grads / unsharded, temp_bytes_per_device=int(mem.temp_size_in_bytes),
        loss_ms=1e3 * t_loss, matmul_ms=1e3 * t_mm,
        # Median of back-to-back pairs: load from other processes hits both sides of each pair.
        time_over_matmul=float(np.median(np.array(raw[0]) / np.array(raw[1]))),
        pfc_rate=pfc_rate, pfc_ms=1e3 * t_pfc,
        pfc_over_matmul=float(np.median(np.array(raw[2]) / np.array(raw[1])))))
    del centers, compiled
  return n, rows


def run_pfc(classes, dim, batch, labels_per_sample, iters, pfc_rate):
  """Dense vs Partial-FC step time at a large batch, whose B*K positives outnumber a shard's rows."""
  mesh = _class_mesh()
  n = mesh.size
  rows = []
  for c in classes:
    emb, labels, centers, key = _problem(mesh, c, dim, batch, labels_per_sample)
    dense, pfc = _loss_step(mesh, c, 1.0), _loss_step(mesh, c, pfc_rate)
    args = (emb, centers, labels, key)
    _, metrics = pfc(*args)[0]
    (t_dense, t_pfc), raw = _time([(dense, args), (pfc, args)], iters)
    c_local = centers_lib.padded_num_classes(c, n) // n
    _, n_sel = partial_fc.selection_size(c_local, pfc_rate, batch * labels_per_sample, n, 2.0)
    rows.append(dict(classes=c, batch=batch, labels=labels_per_sample, pfc_rate=pfc_rate,
                     dense_ms=1e3 * t_dense, pfc_ms=1e3 * t_pfc,
                     speedup=float(np.median(np.array(raw[0]) / np.array(raw[1]))),
                     gathered_columns_per_shard=n_sel, active_columns=float(metrics["pfc_columns"]),
                     overflow=float(metrics["pfc_overflow"])))
    del centers
  return rows


def main(argv=None):
  sharding.use_host_cpu_devices()
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--classes", default="10000,100000,1000000")
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--batch", type=int, default=128, help="global batch")
  ap.add_argument("--labels", type=int, default=8, help="labels per sample (all sampled)")
  ap.add_argument("--iters", type=int, default=7)
  ap.add_argument("--pfc_rate", type=float, default=0.1)
  ap.add_argument("--pfc_classes", default="80000,1000000", help="'' = skip the Partial-FC table")
  ap.add_argument("--pfc_batch", type=int, default=1024, help="global batch of the Partial-FC table")
  ap.add_argument("--pfc_iters", type=int, default=3)
  ap.add_argument("--json", default=None)
  a = ap.parse_args(argv)
  classes = [int(x) for x in a.classes.split(",") if x]
  n, rows = run(classes, a.dim, a.batch, a.labels, a.iters, a.pfc_rate)
  print(f"devices={n} ({jax.devices()[0].platform}) D={a.dim} global batch={a.batch} labels/sample={a.labels}"
        f"; step = forward+backward w.r.t. embeddings and centers")
  hdr = (f"{'C':>6} {'ctr+grad/dev MB':>15} {'unsharded MB':>12} {'fraction':>8} {'temp/dev MB':>11} "
         f"{'loss ms':>8} {'matmul ms':>9} {'loss/mm':>7} {'pfc' + str(a.pfc_rate) + ' ms':>10} {'pfc/mm':>6}")
  print(hdr)
  for r in rows:
    print(f"{_label(r['classes']):>6} {r['bytes_centers_grads_per_device'] / 2**20:15.2f} "
          f"{r['bytes_unsharded'] / 2**20:12.2f} {r['memory_fraction']:8.4f} "
          f"{r['temp_bytes_per_device'] / 2**20:11.2f} {r['loss_ms']:8.1f} {r['matmul_ms']:9.1f} "
          f"{r['time_over_matmul']:7.2f} {r['pfc_ms']:10.1f} {r['pfc_over_matmul']:6.2f}")
  pfc_rows = run_pfc([int(x) for x in a.pfc_classes.split(",") if x], a.dim, a.pfc_batch, a.labels,
                     a.pfc_iters, a.pfc_rate)
  if pfc_rows:
    print(f"\nPartial FC rate {a.pfc_rate} vs dense, global batch {a.pfc_batch} x {a.labels} label slots "
          f"(selection per shard = max(ceil(rate*C/n), its positives), gathered up to 2x the expected positives)")
    print(f"{'C':>6} {'dense ms':>9} {'pfc ms':>8} {'speedup':>7} {'gathered/shard':>14} {'active cols':>11} "
          f"{'overflow':>8}")
    for r in pfc_rows:
      print(f"{_label(r['classes']):>6} {r['dense_ms']:9.1f} {r['pfc_ms']:8.1f} {r['speedup']:7.2f} "
            f"{r['gathered_columns_per_shard'] or 0:14d} {r['active_columns']:11.0f} {r['overflow']:8.0f}")
  if a.json:
    out = dict(devices=n, dim=a.dim, batch=a.batch, rows=rows, pfc_rows=pfc_rows)
    for r in pfc_rows:
      out[f"pfc_speedup_{_label(r['classes'])}"] = r["speedup"]
    for r in rows:
      tag = _label(r["classes"])
      out[f"memory_fraction_{tag}"] = r["memory_fraction"]
      out[f"time_over_matmul_{tag}"] = r["time_over_matmul"]
      out[f"pfc_over_matmul_{tag}"] = r["pfc_over_matmul"]
      out[f"loss_ms_{tag}"] = r["loss_ms"]
      out[f"matmul_ms_{tag}"] = r["matmul_ms"]
    d = os.path.dirname(os.path.abspath(a.json))
    with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
      json.dump(out, f, indent=1)
    os.replace(f.name, a.json)


if __name__ == "__main__":
  main()
