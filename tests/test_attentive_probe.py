"""Attentive probe head against a PyTorch reference, sharded training equals one device, determinism."""
import jax
import numpy as np
import pytest
import torch

from ovenc_jax.eval import attentive_probe as probe_lib

D, HEADS, CLASSES, T = 32, 2, 5, 6


def _t(x):
  return torch.tensor(np.asarray(x, np.float64), requires_grad=True)


def torch_head(p, tokens, mask):
  """The MAP head written out in torch (float64) from flax's parameter tree."""
  a = p["attention"]
  b = tokens.shape[0]
  q = torch.einsum("bqd,dhk->bqhk", p["probe"].expand(b, 1, D), a["query"]["kernel"]) + a["query"]["bias"]
  k = torch.einsum("bnd,dhk->bnhk", tokens, a["key"]["kernel"]) + a["key"]["bias"]
  v = torch.einsum("bnd,dhk->bnhk", tokens, a["value"]["kernel"]) + a["value"]["bias"]
  s = torch.einsum("bqhk,bnhk->bhqn", q, k) / np.sqrt(D // HEADS)
  s = s.masked_fill(~mask[:, None, None, :], -1e30)
  o = torch.einsum("bhqn,bnhk->bqhk", torch.softmax(s, -1), v)
  x = torch.einsum("bqhk,hkd->bqd", o, a["out"]["kernel"]) + a["out"]["bias"]

  def ln(x, n, eps):
    return torch.nn.functional.layer_norm(x, (D,), n["scale"], n["bias"], eps)
  y = torch.nn.functional.rms_norm(x, (D,), p["mlp_norm"]["scale"], 1e-6) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
  y = torch.nn.functional.gelu(y) @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  x = ln((x + y)[:, 0], p["norm"], 1e-5)
  return x @ p["classifier"]["kernel"] + p["classifier"]["bias"]


def test_head_starts_at_the_published_heads_scales():
  """The query at unit scale and query/key/value kernels as torch's MultiheadAttention initialises its
  fused in-projection (Xavier-uniform over [3D, D]); out projection, MLP and classifier normal 0.02
  (timm's trunc_normal_ cuts at +-2 absolute: nothing at this std)."""
  d, heads = 128, 2
  params = jax.jit(probe_lib.MAPHead(num_classes=50, num_heads=heads).init)(
      jax.random.key(0), np.zeros((1, 2, d), np.float32), np.ones((1, 2), bool))["params"]
  torch.manual_seed(0)
  ref = torch.nn.MultiheadAttention(d, heads).in_proj_weight.detach().numpy()
  a = params["attention"]
  for name, part in zip(("query", "key", "value"), np.split(ref, 3)):
    k = np.asarray(a[name]["kernel"]).reshape(d, d)
    assert np.std(k) == pytest.approx(np.std(part), rel=0.03), name
    assert np.abs(k).max() == pytest.approx(np.abs(part).max(), rel=0.01), name
  assert np.std(np.asarray(params["probe"])) == pytest.approx(1.0, rel=0.15)  # torch.randn, d values
  for name, std in (("out", 0.02), ("fc1", 0.02), ("fc2", 0.02), ("classifier", 0.02 * probe_lib.DEFAULTS["init_scale"])):
    k = np.asarray((a if name == "out" else params)[name]["kernel"])
    assert np.std(k) == pytest.approx(std, rel=0.08), name


def _inputs(b=4, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.normal(size=(b, T, D)).astype(np.float32)
  mask = np.ones((b, T), bool)
  mask[1, 3:] = False
  mask[2, 1:] = False
  return tokens, mask, rng.integers(0, CLASSES, b).astype(np.int32)


def test_head_forward_and_one_step_match_torch():
  settings = probe_lib.ProbeSettings(lr=1e-2, clip_norm=0.5, init_scale=1.0)
  head = probe_lib.MAPHead(num_classes=CLASSES, num_heads=HEADS, init_scale=1.0)
  tokens, mask, labels = _inputs()
  params = jax.jit(head.init)(jax.random.key(0), tokens, mask)["params"]
  rng = np.random.default_rng(1)  # off the initial values (zero biases, unit scales) so every term counts
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(np.float32), params)
  tp = jax.tree.map(_t, params)
  tt, tm = torch.tensor(tokens, dtype=torch.float64), torch.tensor(mask)
  ref = torch_head(tp, tt, tm)
  apply = jax.jit(lambda p, x, m: head.apply({"params": p}, x, m))
  out = apply(params, tokens, mask)
  np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=1e-4, atol=1e-5)
  # Padding is ignored: changing masked-out tokens changes nothing.
  noisy = tokens.copy()
  noisy[~mask] += 100.0
  np.testing.assert_allclose(np.asarray(apply(params, noisy, mask)), np.asarray(out), atol=1e-5)

  weights = np.array([1, 1, 1, 0], np.float32)  # the last row is padding
  tx = probe_lib.make_optimizer(settings, total_steps=10)
  step = jax.jit(probe_lib.make_step(head, tx, CLASSES, 0.1))
  new, _, loss = step(params, tx.init(params), dict(tokens=tokens, mask=mask, labels=labels, weights=weights))

  leaves = [x for x in jax.tree.leaves(tp)]
  ref_loss = torch.nn.functional.cross_entropy(ref[:3], torch.tensor(labels[:3], dtype=torch.long),
                                               label_smoothing=0.1)
  ref_loss.backward()
  torch.nn.utils.clip_grad_norm_(leaves, max_norm=0.5)
  opt = torch.optim.AdamW(leaves, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
  grads = [x.grad.numpy().copy() for x in leaves]
  opt.step()
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(new)[0]]
  for name, got, was, want, g in zip(names, jax.tree.leaves(new), jax.tree.leaves(params), leaves, grads):
    if "'key']['bias'" in name:
      # A key bias shifts every logit of a query equally: its gradient is 0 up to rounding, and Adam
      # turns rounding noise into steps of up to lr.
      assert np.abs(g).max() < 1e-12 and np.abs(np.asarray(got) - was).max() <= 1.01e-2, name
      continue
    np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), rtol=1e-4, atol=2e-5, err_msg=name)


def _toy_features(n, seed):
  """Clips whose class is carried by one token among noise, with varying padding."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, CLASSES, n).astype(np.int32)
  protos = np.random.default_rng(99).normal(size=(CLASSES, D)).astype(np.float32)
  tokens = rng.normal(size=(n, T, D)).astype(np.float32)
  mask = np.arange(T)[None] < rng.integers(2, T + 1, n)[:, None]
  where = rng.integers(0, 2, n)
  tokens[np.arange(n), where] += 2.0 * protos[labels]
  return probe_lib.Features(tokens, mask, labels)


@pytest.mark.slow
def test_probe_learns_sharded_equals_single_device_and_is_deterministic():
  train, val = _toy_features(64, 0), _toy_features(32, 1)
  s = probe_lib.ProbeSettings(lr=1e-2, epochs=5, batch_size=16)
  mesh = jax.make_mesh((8,), ("data",))
  one = probe_lib.run_probe(train, val, CLASSES, s)
  eight = probe_lib.run_probe(train, val, CLASSES, s, mesh=mesh)
  again = probe_lib.run_probe(train, val, CLASSES, s, mesh=mesh)
  print(one, eight)
  assert one["top1"] > 0.8, one
  assert eight == again
  assert abs(one["top1"] - eight["top1"]) <= 1 / 32
  np.testing.assert_allclose(one["probe_train_loss"], eight["probe_train_loss"], rtol=1e-4)
  # lr selection on a holdout of the train split: an lr too small to move the head in 5 epochs loses.
  best, scores = probe_lib.select_lr(train, CLASSES, s, [1e-7, 1e-2], mesh=mesh)
  assert best == 1e-2 and scores[1e-2] > scores[1e-7] + 0.3, scores
  held = probe_lib.holdout_split(train.labels, 0.2, s.seed)
  ref = probe_lib.run_probe(train.subset(np.flatnonzero(~held)), train.subset(np.flatnonzero(held)), CLASSES,
                            probe_lib.ProbeSettings(lr=1e-2, epochs=5, batch_size=16), mesh=mesh)
  assert scores[1e-2] == ref["top1"]


def test_holdout_split_is_per_class_and_seeded():
  labels = np.repeat([0, 1, 2, 3], [10, 5, 2, 1])
  held = probe_lib.holdout_split(labels, 0.2, seed=0)
  assert [int(held[labels == c].sum()) for c in range(4)] == [2, 1, 1, 0]  # at least one, never all
  np.testing.assert_array_equal(held, probe_lib.holdout_split(labels, 0.2, seed=0))
  assert not np.array_equal(held, probe_lib.holdout_split(labels, 0.2, seed=1))
  sub = _toy_features(12, 0).subset(np.array([5, 2, 7]))
  full = _toy_features(12, 0)
  np.testing.assert_array_equal(sub.tokens[np.array([2, 0])], full.tokens[np.array([7, 5])])
  np.testing.assert_array_equal(sub.labels, full.labels[[5, 2, 7]])
  assert sub.tokens.shape == (3, T, D) and len(sub) == 3


def test_probe_refuses_bad_settings():
  mesh = jax.make_mesh((8,), ("data",))
  with pytest.raises(ValueError, match=r"eval.attentive.batch_size=12 is not divisible by the 8 devices of mesh axes mesh.data"):
    probe_lib.ProbeTrainer(D, CLASSES, probe_lib.ProbeSettings(batch_size=12), mesh,
                           batch_key="eval.attentive.batch_size")
  with pytest.raises(ValueError, match="1 class"):
    probe_lib.ProbeTrainer(D, 1, probe_lib.ProbeSettings())
  with pytest.raises(ValueError, match="schedule"):
    probe_lib.ProbeTrainer(D, 3, probe_lib.ProbeSettings(schedule="step"))
  empty = probe_lib.Features(np.zeros((0, T, D)), np.zeros((0, T), bool), np.zeros((0,), np.int32))
  with pytest.raises(ValueError, match="validation set has no labelled clips"):
    probe_lib.run_probe(_toy_features(8, 0), empty, CLASSES, probe_lib.ProbeSettings())
