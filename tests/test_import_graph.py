"""The import graph inside `mpt_jax/`: no circle, and no arrow up from a lower layer (issue 28).

Every module under mpt_jax/ is parsed with `ast` (nothing is imported); module-level and
function-level imports both count, and so does `importlib.import_module("<literal>")`."""

from __future__ import annotations

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "mpt_jax"

# config is the bottom of the orchestration: it must not reach up to the modules that run a config (the
# stage loops adapt and train take plain arguments and stay below it; study.py is the study's constants).
ORCHESTRATORS = (
  "mpt_jax.pipeline",
  "mpt_jax.run_setting",
  "mpt_jax.main",
  "mpt_jax.validate_job",
  "mpt_jax.cli",
)


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool, modules=None) -> set[str]:
  """Absolute names of every module `tree` imports (relative imports resolved against `module`).
  `from pkg import name` counts as `pkg.name` where that is one of `modules`, else as `pkg`."""
  base = module.split(".") if is_package else module.split(".")[:-1]
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        root = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
      else:
        root = node.module or ""
      for alias in node.names:
        sub = f"{root}.{alias.name}"
        names.add(sub if modules is None or sub in modules else root)
    elif isinstance(node, ast.Call):
      f = node.func
      is_import_module = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id == "import_module"
      )
      if is_import_module and node.args and isinstance(node.args[0], ast.Constant):
        if isinstance(node.args[0].value, str):
          names.add(node.args[0].value)
  return names


def import_graph() -> dict[str, set[str]]:
  """module -> the intra-package modules it imports (only names that are modules of mpt_jax)."""
  paths = sorted(PACKAGE.rglob("*.py"))
  modules = {module_name(p): p for p in paths}
  graph = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    found = imported_names(tree, name, path.name == "__init__.py", modules)
    graph[name] = {m for m in found if m in modules and m != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None (depth-first search with colours)."""
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_cycle_finder_finds_a_planted_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
  assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}


def test_parser_sees_function_level_and_importlib_imports():
  tree = ast.parse(
    "def f():\n  from mpt_jax import pipeline\n  importlib.import_module('mpt_jax.data.synthetic')\n"
    "from . import settings\n"
  )
  names = imported_names(tree, "mpt_jax.data.crossfit", is_package=False)
  assert {"mpt_jax.pipeline", "mpt_jax.data.synthetic", "mpt_jax.data.settings"} <= names


def test_the_graph_is_nonempty():
  graph = import_graph()
  assert "mpt_jax.pipeline" in graph and graph["mpt_jax.pipeline"], "the parser found no imports"


def test_no_import_circle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_config_does_not_import_the_orchestrator():
  up = sorted(m for m in import_graph()["mpt_jax.config"] if m.startswith(ORCHESTRATORS))
  assert not up, f"mpt_jax.config imports the orchestrator: {up}"


def test_runtime_never_imports_experiments_or_scripts():
  bad = []
  for path in sorted(PACKAGE.rglob("*.py")):
    name = module_name(path)
    found = imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py")
    bad += [f"{name} -> {m}" for m in found if m.split(".")[0] in ("experiments", "scripts")]
  assert not bad, f"the runtime package imports experiment support: {bad}"
