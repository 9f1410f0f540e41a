"""HBM traffic from optimised HLO (ovenc_jax/aot/hlo_traffic.py): hand-counted HLO text and v5e compiles."""
import json

import pytest

from tests.helpers import tpu_compile
from ovenc_jax.aot import hlo_traffic

MiB = 2 ** 20

# Every kind of instruction the counter treats specially, with sizes chosen so the hand count is exact.
HLO = """HloModule t, entry_computation_layout={()->f32[1024,256]{1,0}}

%f (x: f32[1024,256]) -> f32[1024,256] {
  %x = f32[1024,256]{1,0} parameter(0)
  ROOT %y = f32[1024,256]{1,0} add(%x, %x)
}

%body (p: (s32[], f32[1024,256])) -> (s32[], f32[1024,256]) {
  %p = (s32[], f32[1024,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x.1 = f32[1024,256]{1,0} get-tuple-element(%p), index=1
  %y.1 = f32[1024,256]{1,0} fusion(%x.1), kind=kLoop, calls=%f, metadata={op_name="jit(step)/jvp(Encoder)/layers_1/mlp/add"}
  ROOT %t = (s32[], f32[1024,256]{1,0}) tuple(%i, %y.1)
}

%small (q: f32[256,256]) -> f32[256,256] {
  %q = f32[256,256]{1,0} parameter(0)
  ROOT %q2 = f32[256,256]{1,0} negate(%q)
}

%large (q.1: f32[256,256]) -> f32[256,256] {
  %q.1 = f32[256,256]{1,0} parameter(0)
  %q3 = f32[256,256]{1,0} negate(%q.1)
  ROOT %q4 = f32[256,256]{1,0} negate(%q3)
}

%cond (p.1: (s32[], f32[1024,256])) -> pred[] {
  %p.1 = (s32[], f32[1024,256]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[1024,256], b: bf16[512,512], big: f32[4096,256]) -> f32[1024,256] {
  %a = f32[1024,256]{1,0:T(8,128)} parameter(0)
  %b = bf16[512,512]{1,0:T(8,128)(2,1)} parameter(1)
  %big = f32[4096,256]{1,0:T(8,128)} parameter(2)
  %copy-start = (f32[1024,256]{1,0:T(8,128)S(1)}, f32[1024,256]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%a)
  %copy-done = f32[1024,256]{1,0:T(8,128)S(1)} copy-done(%copy-start)
  %fusion = f32[1024,256]{1,0:T(8,128)} fusion(%copy-done, %b), kind=kOutput, calls=%f, metadata={op_name="jit(step)/jvp(Encoder)/layers_0/mlp/add"}
  %slice-start = ((f32[4096,256]{1,0:T(8,128)}), f32[1024,256]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%big), slice={[0:1024], [0:256]}
  %slice-done = f32[1024,256]{1,0:T(8,128)S(1)} slice-done(%slice-start)
  %cat = f32[1024,256]{1,0:T(8,128)S(1)} custom-call(%slice-done), custom_call_target="ConcatBitcast"
  %kernel = f32[8,128]{1,0:T(8,128)} custom-call(%cat), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"cost_estimate":{"flops":"1","transcendentals":"0","bytes_accessed":"10485760"}}}
  %init = (s32[], f32[1024,256]{1,0}) tuple(%kernel, %fusion)
  %loop = (s32[], f32[1024,256]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %branch = s32[] constant(1)
  %side = f32[256,256]{1,0} conditional(%branch, %b, %b), branch_computations={%small, %large}
  ROOT %out = f32[1024,256]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_hand_counted_hlo_text():
  r = hlo_traffic.hbm_traffic(HLO)
  # prefetch 1 (its HBM side once) + fusion 1.5 (the VMEM copy is free; bf16 0.5 read, 1 written)
  # + slice 1 (the slice, not its 4 MiB source) + ConcatBitcast 0 + kernel 10 (its declared bytes
  # exceed its HBM operands) + loop 5 x 2 (one read and one write a trip) + the conditional's larger
  # branch, two 0.25 MiB negations that each read and write.
  assert r["bytes"] == pytest.approx((1 + 1.5 + 1 + 10 + 5 * 2 + 1) * MiB)
  largest = dict(r["largest"])
  assert largest["layers_*/mlp/add"] == pytest.approx(11.5 * MiB)  # layer 0 once, layer 1 five times
  assert largest["(custom-call)"] == 10 * MiB
  assert largest["(negate)"] == 1 * MiB  # the branch not counted leaves no trace either


def test_needs_an_entry_computation():
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_traffic.hbm_traffic("HloModule t\n")


@pytest.mark.parametrize("cut", ["%body (", "%large ("])
def test_a_called_computation_missing_from_the_text_is_named(cut):
  # A dump cut short: the loop's body, or one branch of the conditional, is not in the text.
  text = HLO.replace(cut, "%renamed_" + cut[1:])
  with pytest.raises(ValueError, match=f"calls computation %{cut[1:-2]},"):
    hlo_traffic.hbm_traffic(text)


# Fusions that touch part of an operand, as XLA's GPU backend emits them: a gradient sliced out of the
# all-reduce combiner's flat buffer, a fusion that gathers rows of a table and scatters into another
# in place, and one that reads an operand whole beside one it slices.
PARTIAL = """HloModule p, entry_computation_layout={()->f32[1024,256]{1,0}}

%sliced (flat: f32[1048576]) -> f32[256] {
  %flat = f32[1048576]{0} parameter(0)
  ROOT %s = f32[256]{0} slice(%flat), slice={[1024:1280]}
}

%gather_scatter (grad: f32[1024,256], table: f32[1024,256], idx: s32[64,1], upd: f32[64,256]) -> f32[1024,256] {
  %grad = f32[1024,256]{1,0} parameter(0)
  %table = f32[1024,256]{1,0} parameter(1)
  %idx = s32[64,1]{1,0} parameter(2)
  %rows = f32[64,256]{1,0} gather(%table, %idx), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,256}
  %upd = f32[64,256]{1,0} parameter(3)
  %sum = f32[64,256]{1,0} add(%rows, %upd)
  ROOT %sc = f32[1024,256]{1,0} scatter(%grad, %idx, %sum), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}

%add (l: f32[], r: f32[]) -> f32[] {
  %l = f32[] parameter(0)
  %r = f32[] parameter(1)
  ROOT %a = f32[] add(%l, %r)
}

%mixed (whole: f32[1024,256], part: f32[1024,256]) -> f32[512,256] {
  %whole = f32[1024,256]{1,0} parameter(0)
  %part = f32[1024,256]{1,0} parameter(1)
  %top = f32[512,256]{1,0} slice(%part), slice={[0:512], [0:256]}
  %wb = f32[2,512,256]{2,1,0} bitcast(%whole)
  %r = f32[512,256]{1,0} reduce(%wb, %zero), dimensions={0}, to_apply=%add
  %zero = f32[] constant(0)
  ROOT %m = f32[512,256]{1,0} multiply(%top, %r)
}

ENTRY %main (flat: f32[1048576], grad: f32[1024,256], table: f32[1024,256], idx: s32[64,1], upd: f32[64,256]) -> f32[1024,256] {
  %flat = f32[1048576]{0} parameter(0)
  %grad = f32[1024,256]{1,0} parameter(1)
  %table = f32[1024,256]{1,0} parameter(2)
  %idx = s32[64,1]{1,0} parameter(3)
  %upd = f32[64,256]{1,0} parameter(4)
  %b = f32[256]{0} fusion(%flat), kind=kLoop, calls=%sliced, metadata={op_name="jit(step)/bias_slice"}
  %sc = f32[1024,256]{1,0} fusion(%grad, %table, %idx, %upd), kind=kInput, calls=%gather_scatter, metadata={op_name="jit(step)/scatter"}
  %m = f32[512,256]{1,0} fusion(%sc, %table), kind=kLoop, calls=%mixed, metadata={op_name="jit(step)/mixed"}
  ROOT %out = f32[1024,256]{1,0} copy(%sc)
}
"""


def test_fusions_count_the_part_of_an_operand_they_touch():
  largest = dict(hlo_traffic.hbm_traffic(PARTIAL)["largest"])
  kib = 1024
  # 256 floats read out of a 4 MiB buffer, 1 KiB written.
  assert largest["bias_slice"] == 2 * kib
  # In place: the 64 updated rows read and written (64 KiB each), the 64 rows gathered from the table
  # (64 KiB), the indices (256 B) and the updates (64 KiB); nothing of the rest of either table.
  assert largest["scatter"] == 4 * 64 * kib + 256
  # The operand reduced is read whole (1 MiB), the sliced one only in its first half; 512 KiB written.
  assert largest["mixed"] == 1024 * kib + 512 * kib + 512 * kib
  assert largest["(copy)"] == 2 * 1024 * kib


def test_a_scatter_into_an_operand_read_elsewhere_in_the_fusion_is_not_in_place():
  # The target is also read by the gather: XLA cannot update it in place, the fusion reads it whole.
  text = PARTIAL.replace("%rows = f32[64,256]{1,0} gather(%table,", "%rows = f32[64,256]{1,0} gather(%grad,")
  largest = dict(hlo_traffic.hbm_traffic(text)["largest"])
  # grad whole (1 MiB) + table untouched + indices + updates + the whole result written (1 MiB).
  assert largest["scatter"] == 2 * 1024 * 1024 + 256 + 64 * 1024


_COMPILE = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ovenc_jax.aot import hlo_traffic
topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", chip_config_name="default",
                                    chips_per_host_bounds=(2, 2, 1), num_slices=1)
sh = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), P())
out = {}
def measure(name, f, *shapes):
  c = jax.jit(f).lower(*[jax.ShapeDtypeStruct(s, d, sharding=sh) for s, d in shapes]).compile()
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  out[name] = dict(xla=cost["bytes accessed"], hbm=hlo_traffic.hbm_traffic(c.as_text())["bytes"])
n = 4096
measure("matmul", lambda a, b: a @ b, ((n, n), jnp.bfloat16), ((n, n), jnp.bfloat16))
measure("scale", lambda x: x * 2 + 1, ((8192, 8192), jnp.float32))  # 256 MiB: more than VMEM holds
print(json.dumps(out))
"""


def test_v5e_compiles_count_hbm_operands_once():
  r = json.loads(tpu_compile.run(_COMPILE).strip().splitlines()[-1])
  # One bf16 4096^2 matmul: both operands read once, the result written once. XLA counts the VMEM
  # prefetch of an operand and the later read of that copy as well.
  assert r["matmul"]["hbm"] == 3 * 4096 ** 2 * 2
  assert r["matmul"]["xla"] > 2 * r["matmul"]["hbm"]
  # Nothing fits in VMEM: both counts are the 256 MiB read and the 256 MiB written.
  assert r["scale"]["hbm"] == 2 * 8192 ** 2 * 4
  assert r["scale"]["xla"] == pytest.approx(r["scale"]["hbm"], rel=0.01)
