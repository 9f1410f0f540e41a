"""The package layout: imports run one way along the data flow, no cycles, small modules, no path hacks."""
import ast
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ovenc_format", "data_prep", "ovenc_jax")
MAX_LINES = 600

# Within ovenc_jax, a module may import only from its own layer or those before it: the data flow
# records -> input -> model -> loss -> train -> eval -> interop/aot, with the light defaults at the bottom.
# Configs sit beside the code: nothing in the packages imports them (commands take them by path).
LAYERS = (
    ("ovenc_jax.sharding", r"ovenc_jax\.\w+\.defaults"),
    ("ovenc_jax.model",),
    ("ovenc_jax.loss", "ovenc_jax.input"),
    ("ovenc_jax.train.optim", "ovenc_jax.train.checkpoint"),
    ("ovenc_jax.eval",),
    ("ovenc_jax.train",),
    ("ovenc_jax.interop", "ovenc_jax.aot"),
    ("ovenc_jax.main", "ovenc_jax.evaluate", "ovenc_jax.configs"),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """Project modules that `name` imports, at any depth of its code (lazy imports count too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pkg import mod` imports mod (pkg's __init__ is a docstring); `from mod import name`, mod.
      targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                 for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in MODULES:
        t = t.rpartition(".")[0]
      if t and t != name and not name.startswith(t + "."):
        found.add(t)
  return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
  matches = [(len(p), i) for i, prefixes in enumerate(LAYERS) for p in prefixes
             if re.fullmatch(p + r"(\..*)?", module)]
  return max(matches)[1] if matches else None  # the most specific: train.optim sits below train


def test_sample_format_imports_neither_side():
  bad = {m: sorted(d for d in deps if not d.startswith("ovenc_format"))
         for m, deps in GRAPH.items() if m.startswith("ovenc_format")}
  assert not {m: d for m, d in bad.items() if d}


def test_data_prep_and_trainer_meet_only_in_the_sample_format():
  crossing = sorted((m, d) for m, deps in GRAPH.items() for d in deps
                    if (m.startswith("data_prep") and d.startswith("ovenc_jax"))
                    or (m.startswith("ovenc_jax") and d.startswith("data_prep")))
  assert not crossing


def test_ovenc_jax_imports_follow_the_data_flow():
  upward = []
  for m, deps in GRAPH.items():
    if not m.startswith("ovenc_jax.") or _layer(m) is None:
      continue
    for d in deps:
      if d.startswith("ovenc_jax.") and _layer(d) is not None and _layer(d) > _layer(m):
        upward.append(f"{m} -> {d}")
  assert not upward


def test_no_import_cycles():
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in GRAPH[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in sorted(GRAPH):
    if v not in index:
      visit(v)
  assert not cycles


@pytest.mark.parametrize("folder", PACKAGES)
def test_modules_stay_small(folder):
  long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long


def test_no_path_hacks():
  offenders = []
  for folder in (*PACKAGES, "tests", "benchmarks"):
    for p in (ROOT / folder).rglob("*.py"):
      text = p.read_text()
      if p.name != "test_layout.py" and re.search(r"sys\.path\.(insert|append)|noqa: E402", text):
        offenders.append(str(p.relative_to(ROOT)))
  assert not offenders


def test_no_import_time_environment_changes():
  """Module bodies leave os.environ alone; entry points set what they need before importing jax."""
  offenders = []
  for name, path in MODULES.items():
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, (ast.Assign, ast.Expr)) and "os.environ" in ast.unparse(node):
        offenders.append(f"{name}: {ast.unparse(node)[:80]}")
  assert not offenders


def test_console_scripts_point_at_functions():
  """Every `[project.scripts]` entry names a module-level function of a module in the tree."""
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  missing = []
  for script, target in scripts.items():
    module, func = target.split(":")
    path = MODULES.get(module)
    defined = path is not None and any(isinstance(n, ast.FunctionDef) and n.name == func
                                       for n in ast.parse(path.read_text()).body)
    if not defined:
      missing.append(f"{script} -> {target}")
  assert scripts and not missing
