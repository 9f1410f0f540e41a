"""Center banks (loss.heads): several center tables trained together, and the config-level entry points."""
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from ovenc_jax.loss import defaults
from ovenc_jax.loss.centers import init_centers
from ovenc_jax.loss.discrimination import make_loss_fn, validate_loss_config

# Keys a bank may set for itself; the others are shared by all banks.
_BANK_KEYS = ("num_classes", "scale", "margin", "fn_threshold", "labels_per_step", "sample_rate",
              "centers_lr_mult")


class BankSpec(NamedTuple):
  name: str
  cfg: ml_collections.ConfigDict  # the loss config of this bank alone
  weight: float
  offset: int                     # the bank's class ids are [offset, offset + num_classes) in labels
  label_table: str | None


def _bank_spec(cfg, i: int, head, offset: int, taken: set) -> BankSpec:
  """loss.heads[i] as a BankSpec whose ids start at `offset`; `taken`: the earlier banks' names."""
  allowed = {"name", "weight", "label_table", *_BANK_KEYS}
  if not hasattr(head, "keys") or "name" not in head or "num_classes" not in head:
    raise ValueError(f"loss.heads[{i}] must be a dict with at least 'name' and 'num_classes', got {head!r}")
  unknown = sorted(set(head.keys()) - allowed)
  if unknown:
    raise ValueError(f"loss.heads[{i}] has unknown keys {unknown}; known: {sorted(allowed)}")
  name = head["name"]
  if not isinstance(name, str) or not name.isidentifier() or name in taken:
    raise ValueError(f"loss.heads[{i}].name must be a unique identifier, got {name!r}")
  bank = ml_collections.ConfigDict({k: v for k, v in cfg.items() if k != "heads"})
  bank.update({k: head[k] for k in _BANK_KEYS if k in head})
  try:
    validate_loss_config(bank)
  except ValueError as e:
    raise ValueError(f"loss.heads[{i}] ({name}): {e}") from None
  weight = float(head.get("weight", 1.0))
  if not weight > 0:
    raise ValueError(f"loss.heads[{i}].weight must be > 0, got {weight!r}")
  return BankSpec(name, bank, weight, offset, head.get("label_table"))


def bank_specs(cfg) -> list[BankSpec] | None:
  """The center banks of `loss.heads` (None without heads: one bank, `loss.num_classes` centers).

  Bank i's label ids live at [offset_i, offset_i + num_classes_i) in the batch's labels, offsets
  being the running sum of the banks' num_classes in order; the input pipeline shifts a source's
  labels by the offset of the bank the source names.
  """
  heads = defaults.option(cfg, "heads")
  if not heads:
    return None
  specs, offset = [], 0
  for i, head in enumerate(heads):
    specs.append(_bank_spec(cfg, i, head, offset, {s.name for s in specs}))
    offset += int(specs[-1].cfg.num_classes)
  return specs


def label_space_size(cfg) -> int:
  """Size of the batch's label id space: loss.num_classes, or the banks' classes added up."""
  specs = bank_specs(cfg)
  return int(cfg.num_classes) if specs is None else specs[-1].offset + int(specs[-1].cfg.num_classes)


def source_banks(cfg) -> dict[str, tuple[int, str | None]] | None:
  """{bank name: (label id offset, label table)} for the input pipeline; None without loss.heads."""
  specs = bank_specs(cfg)
  return None if specs is None else {s.name: (s.offset, s.label_table) for s in specs}


def init_centers_from_config(rng, cfg, dim: int, num_shards: int):
  """The centers parameter: one [C_pad, D] array, or {bank name: array} with loss.heads."""
  std = float(defaults.option(cfg, "centers_init_std"))
  specs = bank_specs(cfg)
  if specs is None:
    return init_centers(rng, cfg.num_classes, dim, num_shards, std=std)
  return {s.name: init_centers(jax.random.fold_in(rng, i), s.cfg.num_classes, dim, num_shards, std=std)
          for i, s in enumerate(specs)}


def loss_fn_from_config(mesh, cfg, batch_axes: Sequence[str], class_axes: Sequence[str]):
  """make_loss_fn for one bank, make_banks_loss_fn with loss.heads."""
  make = make_loss_fn if bank_specs(cfg) is None else make_banks_loss_fn
  return make(mesh, cfg, batch_axes, class_axes)


def make_banks_loss_fn(mesh, cfg, batch_axes: Sequence[str], class_axes: Sequence[str]):
  """Several center banks: loss_fn(embeddings [B,D], {name: centers [C_pad_i, D]}, labels [B,L], rng).

  Each bank is make_loss_fn on its own centers (sharded over `class_axes` like one bank) with the
  labels of its id range (shifted to 0..C_i-1, the rest -1) and rng folded with its index. The loss
  is sum_i weight_i * loss_i; metrics are per bank as '<name>/<metric>', plus the total `loss`,
  `loss_count` (terms over all banks) and `labels_out_of_range` (ids in no bank).
  """
  specs = bank_specs(cfg)
  if specs is None:
    raise ValueError("make_banks_loss_fn: loss.heads is empty; use make_loss_fn for one bank")
  fns = [make_loss_fn(mesh, s.cfg, batch_axes, class_axes) for s in specs]
  return functools.partial(_banks_loss, specs, fns)


def _banks_loss(specs: list[BankSpec], fns, embeddings, centers, labels, rng):
  """make_banks_loss_fn's loss: each bank's loss on its slice of the label space, weighted."""
  missing = sorted({s.name for s in specs} - set(centers))
  if missing:
    raise ValueError(f"loss_fn: no centers for banks {missing}; got {sorted(centers)}")
  labels = labels.astype(jnp.int32)
  total, metrics, count = 0.0, {}, 0.0
  for i, (s, fn) in enumerate(zip(specs, fns)):
    n = int(s.cfg.num_classes)
    mine = (labels >= s.offset) & (labels < s.offset + n)
    loss_i, m_i = fn(embeddings, centers[s.name], jnp.where(mine, labels - s.offset, -1),
                     jax.random.fold_in(rng, i))
    total = total + s.weight * loss_i
    count = count + m_i["loss_count"]
    metrics.update({f"{s.name}/{k}": v for k, v in m_i.items() if k != "labels_out_of_range"})
  total_classes = specs[-1].offset + int(specs[-1].cfg.num_classes)
  out_of_range = jnp.sum((labels < -1) | (labels >= total_classes)).astype(jnp.float32)
  metrics.update(loss=jax.lax.stop_gradient(total), loss_count=count, labels_out_of_range=out_of_range)
  return total, metrics
