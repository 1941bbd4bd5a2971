"""The package's layout holds: rooms by role, no import cycles, pure maths, no private imports
across modules, no module too long to read.

Read from the source with ``ast`` (every import, function-level ones included), so a cycle
hidden behind a lazy import still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "collabcompress"
ROOMS = ("maths", "files", "runtime", "methods", "commands")
MAX_LINES = 700


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every import in ``path``, relative ones resolved."""
    me = _module(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            found += [(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
    return found


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for me, path in MODULES.items():
        deps = set()
        for module, name, _ in _imports(path):
            target = f"{module}.{name}" if name and f"{module}.{name}" in MODULES else module
            if target in MODULES and target != me:
                deps.add(target)
        graph[me] = deps
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ROOMS else "top"


def test_the_rooms_exist():
    for room in ROOMS:
        assert (PACKAGE / room / "__init__.py").is_file(), room


def test_no_import_cycles():
    graph, cycles = _graph(), []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_maths_is_pure():
    """maths/ takes tensors and returns tensors: nothing from files/, runtime/, methods/,
    commands/, no transformers, typer, rich, safetensors, and no paths or file system."""
    banned = ("transformers", "typer", "rich", "safetensors", "pathlib", "os", "shutil", "tempfile")
    for me, path in MODULES.items():
        if _room(me) != "maths":
            continue
        for module, _, line in _imports(path):
            if module.startswith("collabcompress."):
                assert _room(module) in ("maths", "top") and module.split(".")[1] in (
                    "maths", "errors", "defaults", "dtypes"), f"{me}:{line} imports {module}"
            assert module.split(".")[0] not in banned, f"{me}:{line} imports {module}"
        assert "open(" not in path.read_text(encoding="utf-8"), f"{me} opens a file"


def test_no_private_imports_across_modules():
    leaks = [f"{me}:{line} imports {module}.{name}" for me, path in MODULES.items()
             for module, name, line in _imports(path)
             if module.startswith("collabcompress") and name and name.startswith("_") and not name.startswith("__")
             and f"{module}.{name}" not in MODULES]
    assert not leaks, leaks


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_700_lines(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines"


def test_the_package_exports_the_public_api():
    import collabcompress

    for name in collabcompress.__all__:
        assert getattr(collabcompress, name) is not None, name
    from collabcompress.commands.compress import compress
    from collabcompress.hf import load_model

    assert collabcompress.compress is compress and collabcompress.load_model is load_model
    with pytest.raises(AttributeError):
        collabcompress.no_such_name  # noqa: B018


# Where a layer may be told rotary from not (docs/method.md "Rotary decoders"): the rotary
# method, its maths, its runtime module, and files/rope.py, the file-side home of rope detection
# and settings. Elsewhere code asks the layer's method (collabcompress.methods.method_for).
# Two more hold named definitions: files/manifest.py's LayerRecord, the manifest's record format,
# parsed in files/, which methods/ import (so methods cannot be asked there without a cycle), and
# the rotary adapter's helpers in runtime/adapters.py. None: the whole module.
ROTARY_HOMES = {"collabcompress.methods.rotary": None, "collabcompress.maths.rotary": None,
                "collabcompress.runtime.attention": None, "collabcompress.files.rope": None,
                "collabcompress.files.manifest": {"LayerRecord"},
                "collabcompress.runtime.adapters": {"_rotary_classes", "check_rotary_frequencies"}}


def _mentions_rotary(test: ast.AST) -> bool:
    return any("rotary" in (n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute)
                            else n.value if isinstance(n, ast.Constant) and isinstance(n.value, str) else "").lower()
               for n in ast.walk(test))


def _rotary_branches(tree: ast.AST, allowed: set[str]) -> list[int]:
    """Lines of ``if``/``elif``/``while``, conditional expressions and comprehension filters that
    test for rotary, outside the top-level definitions named in ``allowed``."""
    found = []

    def visit(node: ast.AST, owner: str | None) -> None:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and owner is None:
            owner = node.name
        tests = [node.test] if isinstance(node, (ast.If, ast.IfExp, ast.While)) else \
            node.ifs if isinstance(node, ast.comprehension) else []
        if owner not in allowed and any(_mentions_rotary(t) for t in tests):
            found.append(tests[0].lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, owner)

    visit(tree, None)
    return found


def test_rotary_is_told_only_in_its_homes():
    """No ``if ... rotary`` outside the rotary method and its homes: other code asks the layer's method."""
    branches = [f"{me}:{line}" for me, path in sorted(MODULES.items())
                if me not in ROTARY_HOMES or ROTARY_HOMES[me] is not None
                for line in _rotary_branches(ast.parse(path.read_text(encoding="utf-8")), ROTARY_HOMES.get(me) or set())]
    assert not branches, branches
