"""HBM traffic of a compiled TPU program, read from its optimised HLO: the bytes that live in HBM, once.

XLA's `cost_analysis()["bytes accessed"]` on TPU counts every operand and result of every
instruction whatever memory it sits in: an operand that memory-space assignment first prefetched
into VMEM is counted at the prefetch (read and write) and again at every read from VMEM, and a
sliced prefetch (`slice-start`) is counted as reading its whole source once per slice, so even a
single matmul reports well over the bytes of its operands and result. This module counts instead,
per instruction of the scheduled program, only the arrays whose layout puts them in HBM (memory
space 0): an async copy or slice moves its HBM side once, a fusion reads its HBM operands and
writes its HBM result, a while loop counts its body times its known trip count, and a Pallas kernel
counts at least what its cost estimate declares (splash re-reads K/V per query block). A fusion
that reads an operand only through static slices, dynamic slices or gathers reads those elements,
not the whole operand (XLA's GPU all-reduce combiner slices each gradient out of one concatenated
buffer; the loss gathers its positives' rows out of the center table), and a fusion rooted in a
scatter or dynamic-update-slice into its own operand updates that buffer in place, moving the
updated elements only. Any other elementwise read of part of an operand is still counted as
reading all of it, so this is an upper bound of the traffic, much closer than XLA's figure; it is
reported beside XLA's, not instead.
"""
import math
import re

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
                "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
                "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
# Instructions that move no data of their own (views, bookkeeping, the second half of an async pair).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "copy-done", "slice-done", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "reduce-scatter-done", "all-to-all-done", "async-done",
         "send-done", "recv-done", "opt-barrier"}
_FREE_CUSTOM_CALLS = {"ConcatBitcast"}


def arrays(type_str: str) -> list[tuple[str, int, int]]:
  """(shape 'dtype[dims]', bytes, memory space) of every array in a (possibly tuple) HLO type."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(type_str):
    if dtype not in DTYPE_BYTES:
      continue
    space = re.search(r"S\((\d+)\)", layout or "")
    n = math.prod(int(d) for d in dims.split(",") if d)
    out.append((f"{dtype}[{dims}]", int(n * DTYPE_BYTES[dtype]), int(space.group(1)) if space else 0))
  return out


def _hbm(type_str: str) -> int:
  return sum(b for _, b, space in arrays(type_str) if space == 0)


def _split_type(rest: str) -> tuple[str, str]:
  """'TYPE opcode(...)...' -> (TYPE, 'opcode(...)...'); tuple types nest parentheses."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 2:]
  i = rest.index(" ")
  return rest[:i], rest[i + 1:]


def tuple_elements(type_str: str) -> list[str]:
  """'(a, (b, c), d)' -> ['a', '(b, c)', 'd']; a non-tuple type is its own single element."""
  t = type_str.strip()
  if not t.startswith("("):
    return [t]
  out, depth, cur = [], 0, ""
  for ch in t[1:-1]:
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  out += [cur] if cur.strip() else []
  return [re.sub(r"/\*.*?\*/", "", e).strip() for e in out]


def _computations(hlo_text: str) -> tuple[dict, str]:
  """{name: [instruction text, ...]} (continuation lines joined) and the entry's name."""
  comps, entry, cur = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and line.rstrip().endswith("{"):
      cur = header.group(2)
      comps[cur] = []
      if header.group(1):
        entry = cur
    elif line.rstrip() == "}":
      cur = None
    elif cur is not None:
      if line.startswith("  %") or line.startswith("  ROOT "):
        comps[cur].append(line)
      elif comps[cur]:
        comps[cur][-1] += line
  if entry is None:
    raise ValueError("HLO text has no ENTRY computation")
  return comps, entry


def _operands(call: str) -> list[str]:
  depth = 0
  for i, ch in enumerate(call):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0 and i:
      return re.findall(r"%([\w.\-]+)", call[:i + 1])
  return []


# Ops through which a fused computation reads only part of an operand, and views that pass it on.
_PARTIAL_READS = {"slice", "dynamic-slice", "gather"}
_VIEWS = {"bitcast", "reshape"}
_IN_PLACE_ROOTS = {"scatter": 2, "dynamic-update-slice": 1}  # opcode -> index of its update operand


def _instructions(comp_lines):
  """(name, type, opcode, text after the type, operand names, is the root) of each instruction."""
  for line in comp_lines:
    m = _INSTR.match(line)
    if not m:
      continue
    iname, rest = m.groups()
    type_str, rest = _split_type(rest)
    opcode = re.match(r"([\w\-]+)\(", rest)
    if opcode:
      opcode = opcode.group(1)
      yield iname, type_str, opcode, rest, _operands(rest[len(opcode):]), line.lstrip().startswith("ROOT ")


def _fusion_bytes(comp_lines, type_str, operand_types) -> int | None:
  """HBM bytes of a fusion whose computation reads some operand only in part or updates one in
  place; None where neither applies (every operand read whole, the result written whole)."""
  instrs, params, root = {}, {}, None
  for iname, itype, opcode, rest, ops, is_root in _instructions(comp_lines):
    instrs[iname] = (opcode, itype, ops)
    root = iname if is_root else root
    if opcode == "parameter":
      params[int(re.match(r"parameter\((\d+)\)", rest).group(1))] = iname
  users = {}
  for name, (_, _, ops) in instrs.items():
    for o in ops:
      users.setdefault(o, []).append(name)

  def readers(name):
    """The instructions reading `name` through views, or None if a reader that is not a view reads it whole."""
    out = []
    for u in users.get(name, []):
      op, _, ops = instrs[u]
      if op in _VIEWS:
        sub = readers(u)
        if sub is None:
          return None
        out += sub
      elif op in _PARTIAL_READS and ops[0] == name and all(o != name for o in ops[1:]):
        out.append(u)
      else:
        return None
    return out

  in_place = None  # (parameter index, bytes of the update)
  root_op, _, root_ops = instrs[root]
  if root_op in _IN_PLACE_ROOTS and len(root_ops) > _IN_PLACE_ROOTS[root_op]:
    # The buffer updated must reach the root only through views that nothing else reads.
    target, reader = root_ops[0], root
    while target in instrs and instrs[target][0] in _VIEWS and users.get(target) == [reader]:
      target, reader = instrs[target][2][0], target
    update = instrs.get(root_ops[_IN_PLACE_ROOTS[root_op]])
    if target in params.values() and users.get(target) == [reader] and update is not None:
      idx = next(i for i, n in params.items() if n == target)
      in_place = (idx, sum(b for _, b, _ in arrays(update[1])))
  partial = False
  total = 0
  for idx, t in enumerate(operand_types):
    whole = _hbm(t)
    if in_place and idx == in_place[0]:
      total += min(whole, in_place[1]) if whole else 0
      partial = True
      continue
    name = params.get(idx)
    if name is not None and not users.get(name):  # passed in, never read
      partial = True
      continue
    parts = readers(name) if name is not None else None
    if whole and parts:
      total += min(whole, sum(b for _, b, _ in (x for r in parts for x in arrays(instrs[r][1]))))
      partial = True
    else:
      total += whole
  if not partial:
    return None
  out = _hbm(type_str)
  return total + (min(out, in_place[1]) if in_place and out else out)


def _instruction_bytes(opcode, type_str, rest, operand_types, comps, by_name, scale):
  """HBM bytes of one instruction (a loop or call: of its called computations)."""
  if opcode in _FREE:
    return 0
  if opcode == "custom-call":
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    if target and target.group(1) in _FREE_CUSTOM_CALLS:
      return 0
  if opcode == "while":
    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
    body = re.search(r"body=%([\w.\-]+)", rest)
    n = int(trips.group(1)) if trips else 1
    return n * _computation_bytes(body.group(1), comps, by_name, scale * n)
  if opcode in ("call", "conditional"):  # a conditional: its most expensive branch
    called = re.findall(r"(?:to_apply|true_computation|false_computation)=%([\w.\-]+)", rest)
    branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
    called += re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
    best, best_names = 0, {}
    for name in called:
      names = {}
      nbytes = _computation_bytes(name, comps, names, scale)
      if nbytes >= best:
        best, best_names = nbytes, names
    for key, nbytes in best_names.items():
      by_name[key] = by_name.get(key, 0) + nbytes
    return best
  if opcode == "copy-start":  # (destination, source, context): each side that is in HBM, once
    dest, src = tuple_elements(type_str)[:2]
    return _hbm(dest) + _hbm(src)
  if opcode == "slice-start":  # ((source), destination, context): the slice is read, then written
    parts = tuple_elements(type_str)
    src_in_hbm = any(space == 0 for _, _, space in arrays(parts[0]))
    dest = arrays(parts[1])
    return sum(b for _, b, _ in dest) * src_in_hbm + sum(b for _, b, space in dest if space == 0)
  if opcode.endswith("-start"):  # async collectives: ((operands), (results), ...)
    parts = tuple_elements(type_str)
    return sum(_hbm(p) for p in parts[:2])
  if opcode == "dynamic-update-slice":  # in place: the update is read and written
    return 2 * _hbm(operand_types[1]) if len(operand_types) > 1 else 0
  if opcode == "dynamic-slice":
    return 2 * _hbm(type_str)
  if opcode == "fusion":
    called = re.search(r"calls=%([\w.\-]+)", rest)
    if called and called.group(1) in comps:
      nbytes = _fusion_bytes(comps[called.group(1)], type_str, operand_types)
      if nbytes is not None:
        return nbytes
  total = _hbm(type_str) + sum(_hbm(t) for t in operand_types)
  if opcode == "custom-call":
    declared = re.search(r'"cost_estimate":\{[^}]*"bytes_accessed":"(\d+)"', rest)
    if declared:
      total = max(total, int(declared.group(1)))
  return total


def _computation_bytes(name, comps, by_name, scale):
  """HBM bytes of one execution of computation `name`; by_name gets them times `scale`."""
  if name not in comps:
    raise ValueError(f"HLO text calls computation %{name}, which it does not define (truncated dump?)")
  types, total = {}, 0
  for iname, type_str, opcode, rest, operands, _ in _instructions(comps[name]):
    types[iname] = type_str
    operand_types = [types.get(o, "") for o in operands]
    nbytes = _instruction_bytes(opcode, type_str, rest, operand_types, comps, by_name, scale)
    if opcode not in ("while", "call", "conditional") and nbytes:
      op_name = re.search(r'op_name="([^"]*)"', rest)
      key = _short_op_name(op_name.group(1)) if op_name else f"({opcode})"
      by_name[key] = by_name.get(key, 0) + nbytes * scale
    total += nbytes
  return total


def _short_op_name(op_name: str) -> str:
  """'jit(step)/transpose(jvp(Encoder))/layers_3/self_attn/...' -> 'bwd layers_*/self_attn/...'."""
  s = re.sub(r"^jit\([^)]*\)/", "", op_name)
  direction = "bwd " if s.startswith("transpose(") else ""
  s = re.sub(r"^(transpose\()?jvp\([^)]*\)\)?/?", "", s)
  s = re.sub(r"layers_\d+", "layers_*", s)
  return direction + "/".join(s.split("/")[:3])


def hbm_traffic(hlo_text: str, top: int = 15) -> dict:
  """{'bytes': HBM bytes per device per execution, 'largest': [(op name, bytes), ...]}.

  Loop bodies count times their known trip count; op names merge across layers (layers_*)."""
  comps, entry = _computations(hlo_text)
  by_name = {}
  total = _computation_bytes(entry, comps, by_name, 1)
  largest = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
  return {"bytes": float(total), "largest": [[k, float(v)] for k, v in largest]}
