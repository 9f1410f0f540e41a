"""The loss's `config.loss` defaults as plain data (no jax, so configs import it cheaply)."""
import ml_collections

RECIPES = ("default", "official")

# How a row's own columns leave its logits (loss.own_label_mask): 'scatter' writes -inf into them in
# place; 'compare' keeps a column when it differs from each of the row's few own columns, compares
# fused into the logits' elementwise pass. 'auto' scatters on CPU, where it is the faster of the two,
# and compares on TPU and GPU, where the in-place scatter makes XLA write the logits out once more
# (docs/benchmarks.md).
OWN_LABEL_MASKS = ("auto", "scatter", "compare")

# Keys added after the first release: configs saved without them read these values.
OPTIONAL_DEFAULTS = dict(
    # 'default' (this project's loss) or 'official' (OneVision-Encoder's): see
    # discrimination.make_loss_fn and docs/clustering.md.
    recipe="default",
    # Partial FC gathers max(ceil(rate*C/n), slack * expected positives per shard) columns; more
    # positives than that overflow (counted in metrics["pfc_overflow"]), never a wrong gradient.
    pfc_positive_slack=2.0,
    # 0 = unit-norm Gaussian rows; > 0 = N(0, std^2) entries (the published init uses 0.01).
    centers_init_std=0.0,
    # Several center banks trained together: [{"name", "num_classes", optional "weight", "label_table"
    # and any per-bank loss key}], see banks.bank_specs. Empty = one bank, `num_classes` centers.
    heads=[],
    # How a sample's own classes are kept out of its negatives: 'auto' | 'scatter' | 'compare'
    # (OWN_LABEL_MASKS; same result, different cost per platform).
    own_label_mask="auto",
    # The center table's rows are padded to a multiple of this (and of the class shard count): a
    # checkpoint restores onto any mesh whose class shard count divides it. GPU presets raise it so
    # each GPU's rows are a multiple of 256, which XLA's split-K matmuls over the classes need to
    # read the table in place instead of copying it into a padded buffer (docs/benchmarks.md).
    center_row_multiple=128,
)


def default_loss_config() -> ml_collections.ConfigDict:
  """Loss defaults; `num_classes` must be set to the number of cluster centers before use."""
  return ml_collections.ConfigDict(dict(
      num_classes=0,          # number of concept centers (rows of centers.npy)
      scale=64.0,             # s: logits are s * cos
      margin=0.3,             # m: CosFace margin subtracted from the positive's cosine
      fn_threshold=0.75,      # negatives with cos > this are dropped (likely false negatives); None = off
      labels_per_step=8,      # labels sampled per sample per step, each its own softmax
      sample_rate=1.0,        # Partial-FC fraction of centers used as negatives per shard
      centers_lr_mult=1.0,    # learning-rate multiplier of the centers (consumed by the optimizer)
      # The loss only sees normalised centers, so weight decay would merely shrink their norm and
      # thereby raise their effective learning rate; off by default.
      centers_weight_decay=0.0,
      **OPTIONAL_DEFAULTS,
  ))


def option(cfg, key: str):
  """cfg[key], or its OPTIONAL_DEFAULTS value in a config saved before the key existed."""
  return cfg[key] if key in cfg else OPTIONAL_DEFAULTS[key]
