"""ovenc_jax.aot.compile: the real train step compiled for compile-only TPU / GPU devices, run as the CLI in subprocesses."""
import contextlib
import fcntl
import importlib.util
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import digit_shards
from ovenc_jax.configs import pretrain
from ovenc_jax.aot import compile as aot
from ovenc_jax.aot.figures import figures
from ovenc_jax.input import global_arrays
from ovenc_jax.input import pipeline as input_pipeline
from ovenc_jax.train import trainer as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One compile at a time across test processes: each takes a core and much memory.
LOCK_PATH = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ovenc_aot_tests.lock")

# base widths at depth 1 (elementwise work is small next to its matmuls), a 2x2x2 mesh, no remat.
SHARDED_OVERRIDES = {"model.depth": 1, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                     "input.global_batch_size": 8, "input.tokens_per_row": 256, "input.max_segments": 1,
                     "loss.num_classes": 1000,
                     # XLA's cost analysis counts a splash (Pallas) kernel as 0 FLOPs, and `auto` picks
                     # splash on TPU: the FLOP comparison needs attention that XLA can see.
                     "model.attention": "xla"}


@contextlib.contextmanager
def _compile_slot():
  with open(LOCK_PATH, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_aot(tmp_path, variant, topology, overrides=(), extra=()):
  out = tmp_path / "report.json"
  cmd = [sys.executable, "-m", "ovenc_jax.aot.compile", f"--config={aot.PRETRAIN_CONFIG}:variant={variant}",
         f"--topology={topology}", f"--json={out}", *[f"--config.{k}={v}" for k, v in dict(overrides).items()],
         *extra]
  with _compile_slot():
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode in (0, 1), proc.stderr[-4000:]
  return proc, json.loads(out.read_text())


def _tree_bytes_per_device(tree):
  return sum(t["bytes_per_device"] for t in tree.values())


@pytest.mark.slow
def test_tiny_on_v5e_2x2_compiles_and_reports(tmp_path):
  proc, r = run_aot(tmp_path, "tiny", "v5e:2x2", {"model.attention": "xla"},
                    extra=[f"--dump={tmp_path / 'hlo'}", f"--save={tmp_path / 'step.pkl'}"])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "FITS" in proc.stdout and "DOES NOT FIT" not in proc.stdout
  assert r["num_devices"] == 4 and "v5" in r["device_kind"].lower()
  assert r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and r["per_device_batch"] == 16 // 4
  m = r["memory"]
  assert 0 < m["total"] < r["hbm_bytes"] and r["fits"]
  # The step's arguments are the state shards plus the batch shard; the donated state is aliased.
  t = r["shardings"]["tensors"]
  state = sum(_tree_bytes_per_device(t[g]) for g in ("params", "centers", "opt_state"))
  batch = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in _tiny_trainer().abstract_batch().values()) // 4
  np.testing.assert_allclose(m["arguments"], state + batch, rtol=0.05)
  np.testing.assert_allclose(m["aliased"], state, rtol=0.05)
  assert r["xla_flops_per_device"] > r["model_flops_per_device"] > 0
  assert r["step_s_roofline"] == max(r["step_s_compute"], r["step_s_memory"]) > 0
  # Data parallel: the gradients are summed over the 4 devices.
  assert r["collectives"]["by_kind"]["all-reduce"]["count"] >= 1
  assert r["collectives"]["largest"][0]["bytes"] >= _tree_bytes_per_device(t["params"]) * 0.9
  hlo = (tmp_path / "hlo" / "train_step.hlo.txt").read_text()
  assert aot.collectives(hlo) == r["collectives"]
  assert "stablehlo" in (tmp_path / "hlo" / "train_step.stablehlo.mlir").read_text()
  with open(tmp_path / "step.pkl", "rb") as f:
    payload, in_tree, out_tree = pickle.load(f)
  assert len(payload) > 1000 and in_tree.num_leaves == len(jax.tree.leaves(_tiny_trainer().abstract_state)) + 6


def _tiny_trainer():
  return train.Trainer(pretrain.get_config("tiny"), workdir="")


@pytest.mark.slow
def test_base_with_1024_clips_on_v5e_2x2_does_not_fit(tmp_path):
  proc, r = run_aot(tmp_path, "base", "v5e:2x2", {"input.global_batch_size": 1024,
                                                  "input.tokens_per_row": 512, "input.max_segments": 1,
                                                  "loss.num_classes": 100_000})
  assert proc.returncode == 1
  assert "DOES NOT FIT" in proc.stdout
  assert r["fits"] is False
  if "memory" in r:
    assert r["memory"]["total"] > r["hbm_bytes"]
  else:
    assert "HBM" in r["compiler_message"] or "RESOURCE_EXHAUSTED" in r["compiler_message"]


@pytest.mark.slow
def test_shardings_match_the_trainer_and_model_flops_match_xla(tmp_path):
  proc, r = run_aot(tmp_path, "base", "v5e:2x4", SHARDED_OVERRIDES)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  config = pretrain.get_config("base")
  for key, value in SHARDED_OVERRIDES.items():
    section, name = key.split(".")
    config[section][name] = value
  trainer = train.Trainer(config, workdir="", devices=jax.devices())  # the 8 host devices
  groups = {"params": trainer.state_shardings["params"]["encoder"],
            "centers": trainer.state_shardings["params"]["centers"],
            "opt_state": trainer.state_shardings["opt_state"]}
  for group, tree in groups.items():
    expect = {jax.tree_util.keystr(p) or "[]": [list(a) if isinstance(a, tuple) else a for a in s.spec]
              for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}
    got = {k: v["spec"] for k, v in r["shardings"]["tensors"][group].items()}
    assert got == expect, group
  sharded = [v for v in r["shardings"]["tensors"]["params"].values() if any(v["spec"])]
  assert len(sharded) > 10
  # No remat: XLA's count is the model's matmuls plus elementwise work (norms, GELU, softmax, Adam).
  np.testing.assert_allclose(r["xla_flops_per_device"], r["model_flops_per_device"], rtol=0.05)
  # FSDP: the weights sharded over fsdp are gathered before use and their gradients reduce-scattered
  # into their shards; what is all-reduced (over data) is no more than the per-device shards.
  params = r["shardings"]["tensors"]["params"]
  fsdp_bytes = sum(v["bytes_per_device"] for v in params.values() if "fsdp" in str(v["spec"]))
  c = r["collectives"]["by_kind"]
  assert c["reduce-scatter"]["bytes"] >= 0.95 * fsdp_bytes, (c, fsdp_bytes)
  assert c["all-gather"]["bytes"] >= 2 * 2 * fsdp_bytes * 0.5 * 0.95  # bf16 copies, forward and backward
  assert c["all-reduce"]["bytes"] <= 1.6 * _tree_bytes_per_device(params), c
  # benchmarks/bench_aot.py's figures from this report.
  f = figures("case", r)
  t_compute = r["model_flops_per_device"] / r["peak_flops"]
  t_hbm = r["bytes_accessed_per_device"] / r["hbm_bandwidth"]
  assert f["case_compute_fraction"] == pytest.approx(t_compute / max(t_compute, t_hbm))
  assert 0.95 < f["case_model_over_xla_flops"] < 1.05
  assert f["case_collective_bytes_per_device"] == sum(v["bytes"] for v in c.values())
  # Weights and Adam moments are split 4 ways (fsdp x tensor); only norms and biases are whole.
  assert 0.45 < f["case_param_opt_over_total_per_fsdp"] < 0.6
  assert f["case_fits"] == 1 and f["case_replicated_over_64mib"] == 0


def test_bench_aot_refuses_unknown_cases_before_compiling():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_aot.py"),
                         "--cases", "large_v5p128,base_v5e512"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "--cases: 'base_v5e512' is unknown; known: large_v5p128" in proc.stderr


def _installed(module: str) -> bool:
  try:  # find_spec raises, not returns None, when the parent package is absent
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def _has_cuda_plugin() -> bool:
  return _installed("jax_plugins.xla_cuda12")


@pytest.mark.skipif(not _has_cuda_plugin(),
                    reason="GPU targets need requirements-aot-gpu.txt (jax-cuda12-plugin)")
def test_tiny_on_h100x8_compiles(tmp_path):
  proc, r = run_aot(tmp_path, "tiny", "h100x8")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert r["num_devices"] == 8 and "H100" in r["device_kind"] and r["fits"]
  assert r["hbm_bytes"] == 84978434048  # the target description's device_memory_size
  assert r["collectives"]["by_kind"]


@pytest.mark.skipif(not (_has_cuda_plugin() and _installed("nvidia.cudnn")),
                    reason="cuDNN attention on GPU targets needs requirements-aot-gpu.txt (plugin and cuDNN)")
def test_h100_compile_runs_cudnn_flash_attention(tmp_path):
  proc, r = run_aot(tmp_path, "tiny", "h100x8", {"model.dtype": "bfloat16", "model.attention": "cudnn"},
                    extra=[f"--dump={tmp_path / 'hlo'}"])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  hlo = (tmp_path / "hlo" / "train_step.hlo.txt").read_text()
  # cuDNN's fused attention (the segment mask enters as a bias), forward and backward, once per layer;
  # HBM traffic counted without XLA's cost analysis (which GPU targets lack).
  depth = pretrain.get_config("tiny").model.depth
  assert hlo.count('custom_call_target="__cudnn$fmhaScaleBiasSoftmax"') == depth
  assert hlo.count('custom_call_target="__cudnn$fmhaScaleBiasSoftmaxBackward"') == depth
  assert r["bytes_accessed_per_device"] is None and r["hbm_traffic_per_device"] > 0


def test_abstract_batch_matches_the_input_pipeline(tmp_path):
  config = pretrain.get_config("tiny")
  path = digit_shards.write_digit_shards(str(tmp_path / "shards"), 0, 64, num_shards=2)
  config.input.sources = [{"path": path, "weight": 1.0}]
  trainer = train.Trainer(config, workdir=str(tmp_path / "w"))
  batch = global_arrays.global_batch(next(input_pipeline.make_train_iterator(config.input)), trainer.mesh,
                                     trainer.batch_axes)
  abstract = trainer.abstract_batch()
  assert set(abstract) == set(batch)
  for key, a in abstract.items():
    assert (a.shape, a.dtype, a.sharding) == (batch[key].shape, batch[key].dtype, batch[key].sharding), key


@pytest.mark.parametrize("name, expect", [
    ("v5e-256", dict(topology_name="v5e:16x16", chip_config_name="default")),
    ("v5p-128", dict(topology_name="v5p:4x4x4", chip_config_name="megacore")),
    ("v4-16", dict(topology_name="v4:2x2x2", chip_config_name="megacore")),
    ("v6e-8", dict(topology_name="v6e:2x4", chip_config_name="default")),
    ("v5e:2x2", dict(topology_name="v5e:2x2", chip_config_name="default")),
    ("h100x8x2", dict(platform="cuda", topology="1x2x8")),
])
def test_topology_names(name, expect):
  spec = aot.parse_topology(name)
  assert {k: spec[k] for k in expect} == expect


@pytest.mark.parametrize("name", ["v5e-100", "v7-8", "v5p-7", "v5e:2x2x2", "h200x8"])
def test_bad_topology_names_the_flag(name):
  with pytest.raises(ValueError, match="--topology"):
    aot.parse_topology(name)


def test_collectives_from_hlo_text():
  hlo = "\n".join([
      "  %all-reduce.1 = (f32[128,4]{1,0}, bf16[10]{0}) all-reduce(%a, %b), channel_id=1",
      "  %ag = f32[32,128]{1,0:T(8,128)} all-gather(%c), dimensions={0}",
      "  %ags = (f32[8,128]{1,0}, f32[64,128]{1,0}) all-gather-start(%d), dimensions={0}",
      "  %agd = f32[64,128]{1,0} all-gather-done(%ags)",
      "  %fusion = f32[32,128]{1,0} fusion(%ag), kind=kLoop",
      # XLA combines tensors into one async op typed ((operands), (results), ...): results count.
      "  %rss = ((f32[64,8]{1,0}, f32[16]{0}), (f32[8,8]{1,0}, /*index=2*/f32[2]{0}), u32[]) reduce-scatter-start(%e)",
      "  %agc = ((bf16[2,4]{1,0:T(8,128)}, bf16[3]{0}), (bf16[16,4]{1,0:T(8,128)}, bf16[24]{0})) all-gather-start(%g, %h)",
  ])
  c = aot.collectives(hlo)
  assert c["by_kind"] == {"all-reduce": {"count": 1, "bytes": 128 * 4 * 4 + 20},
                          "all-gather": {"count": 3, "bytes": 32 * 128 * 4 + 64 * 128 * 4 + 2 * (64 + 24)},
                          "reduce-scatter": {"count": 1, "bytes": 4 * (8 * 8 + 2)}}
  assert [o["name"] for o in c["largest"]] == ["ags", "ag", "all-reduce.1", "rss", "agc"]
  assert c["largest"][4]["shapes"] == ["bf16[16,4]", "bf16[24]"]


@pytest.fixture()
def host_environment():
  aot.prepare_host_environment()


def test_two_slices_double_the_devices(host_environment):
  target = aot.get_target("v5e:2x2", num_slices=2)
  assert len(target.devices) == 8
  assert sorted(d.slice_index for d in target.devices) == [0] * 4 + [1] * 4


def test_replicated_tensors_over_64_mib_are_flagged():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("data",))

  def leaf(shape, spec):
    return jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, spec))

  state = {"params": {"encoder": {"big": leaf((4096, 4097), P()), "small": leaf((1024, 1024), P()),
                                  "split": leaf((8192, 4096), P("data"))},
                      "centers": leaf((1024, 64), P("data"))},
           "opt_state": {"mu": leaf((4096, 4097), P())}}
  report = aot.sharding_report(state)
  assert report["tensors"]["params"]["['split']"] == dict(shape=[8192, 4096], spec=["data"],
                                                          bytes=8192 * 4096 * 4,
                                                          bytes_per_device=8192 * 4096 * 4 // 8)
  assert len(report["warnings"]) == 2
  assert all("['big']" in w or "['mu']" in w for w in report["warnings"])


def _python(code, **env):
  clean = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY",
                                                          "ALLOW_MULTIPLE_LIBTPU_LOAD")}
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        env=dict(clean, **env))


def test_import_has_no_side_effects_and_the_host_set_up_is_explicit():
  proc = _python("import os, sys\n"
                 "from ovenc_jax.aot import compile as aot\n"
                 "assert 'jax' not in sys.modules and 'JAX_PLATFORMS' not in os.environ\n"
                 "aot.prepare_host_environment()\n"
                 "import jax\n"
                 "print(os.environ['TPU_SKIP_MDS_QUERY'], jax.config.jax_platforms, jax.default_backend())\n")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["1", "cpu", "cpu"]
  # Too late once jax is imported onto another platform: a clear error, not a silent GPU/TPU host.
  proc = _python("import jax\n"
                 "from ovenc_jax.aot import compile as aot\n"
                 "aot.prepare_host_environment()\n", JAX_PLATFORMS="cuda")
  assert proc.returncode != 0
  assert "call aot.prepare_host_environment() before importing jax" in proc.stderr
