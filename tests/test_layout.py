"""The package's layering: no import cycles, and the command lines on top of the library.

Every import of a lima_jax module counts, at module level or inside a function (a lazy import
hides a cycle from the interpreter, not from the design). Only the `if __name__ == "__main__":`
block of a module run as a script is left out: it runs as `__main__`, never on import.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lima_jax"


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _owner(name: str) -> str | None:
  """The lima_jax module that `import name` loads last (`lima_jax.a.b` -> the longest known)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _is_main_guard(node: ast.AST) -> bool:
  test = getattr(node, "test", None)
  return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
          and isinstance(test.left, ast.Name) and test.left.id == "__name__"
          and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def imported_modules(path: pathlib.Path, name: str | None = None) -> set[str]:
  """The lima_jax modules a file (module `name`) imports: `import lima_jax.x`, `from lima_jax
  import x`, `from lima_jax.x import y` (y itself when it is a module) and relative imports."""
  name = name or module_name(path)
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()

  def visit(node):
    if _is_main_guard(node):
      return
    if isinstance(node, ast.Import):
      found.update(_owner(a.name) for a in node.names if a.name.split(".")[0] == "lima_jax")
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      if module.split(".")[0] == "lima_jax":
        for alias in node.names:
          found.add(_owner(f"{module}.{alias.name}"))
    for child in ast.iter_child_nodes(node):
      visit(child)

  visit(tree)
  found.discard(None)
  found.discard(name)
  # `import lima_jax.x` also runs lima_jax/__init__.py, which imports no submodule eagerly.
  found.discard("lima_jax")
  return found


GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done.
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle for each group of modules that import one another, so a failure names them all."""
  cycles, graph = [], {k: set(v) for k, v in graph.items()}
  while (cycle := find_cycle(graph)) is not None:
    cycles.append(cycle)
    graph[cycle[-2]].discard(cycle[-1])  # Break this one and look for the next.
  return cycles


def test_the_checker_sees_every_kind_of_import(tmp_path):
  source = tmp_path / "m.py"
  source.write_text(
      "import lima_jax.data\nfrom lima_jax import paths as p, errors\nfrom lima_jax.cli import common\n"
      "from lima_jax.model import ModelConfig\nfrom . import sharding\n"
      "def f():\n  from lima_jax import process\n"
      "if __name__ == '__main__':\n  from lima_jax.cli import train\n")
  assert imported_modules(source, "lima_jax.m") == {"lima_jax.sharding", "lima_jax.data", "lima_jax.paths", "lima_jax.errors",
                                      "lima_jax.cli.common", "lima_jax.model", "lima_jax.process"}
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert len(all_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}})) == 2


def test_no_import_cycles():
  cycles = all_cycles(GRAPH)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_command_lines():
  offenders = {name: sorted(m for m in imports if m.startswith("lima_jax.cli"))
               for name, imports in GRAPH.items() if not name.startswith("lima_jax.cli")}
  offenders = {name: mods for name, mods in offenders.items() if mods}
  assert not offenders, f"library modules importing lima_jax.cli: {offenders}"


# jax's own import sets libtpu's variables where libtpu is installed (TPU_LIBRARY_PATH, ...);
# what must change nothing is lima_jax's code, so the snapshot is taken after it.
_IMPORT_SCRIPT = """
import os, sys
import jax
before = dict(os.environ)
import lima_jax
lima_jax.load_pretrained, lima_jax.load_tokenizer, lima_jax.train, lima_jax.inference
from lima_jax import cli
from lima_jax.cli import common, evaluate, chat
assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
assert "JAX_PLATFORMS" not in os.environ
print("ok")
"""


@pytest.mark.slow
def test_import_leaves_the_environment_alone():
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "LIMA_JAX_AUTO_CPU")}
  env["PYTHONPATH"] = str(ROOT)
  proc = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_the_commands_load_no_jax_before_their_process_set_up():
  """libtpu's environment (lima-aot) and the CPU allocator restart (lima-train) must come first."""
  script = ("import sys\nimport lima_jax.cli.common, lima_jax.cli.aot_compile, lima_jax.cli.train\n"
            "import lima_jax.process, lima_jax.chips\nprint(sorted(m for m in sys.modules if m.split('.')[0] == 'jax'))")
  proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-3000:]
