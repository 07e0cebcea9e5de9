"""The package's imports only go down the pipeline (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import mergekit_collapse

PACKAGE = Path(mergekit_collapse.__file__).parent

#: top-level parts of the package, lowest first: a module may import its own part or a lower one
LAYERS = [
    ("errors", "_constants", "_console", "_io", "_version", "runtime"),
    ("models",),
    ("guard",),
    ("actions",),
    ("merge",),
    ("evaluate",),
    ("publish",),
    ("pipeline",),
    ("planner",),
    ("analysis", "ci", "schemas"),
    ("demo",),
    ("cli", "__main__"),
]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str | None:
    """`mergekit_collapse.guard.config` -> `guard`; the package itself -> None."""
    names = module.split(".")
    return names[1] if names[0] == "mergekit_collapse" and len(names) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    names = list(rel.parts)
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def _resolve(module: str, node: ast.ImportFrom) -> str | None:
    """The absolute module a `from` import names (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module
    names = module.split(".")
    keep = len(names) - node.level + (1 if _is_package(module) else 0)  # a package is its own level
    return ".".join(names[:keep] + ([node.module] if node.module else []))


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks: imports there never run."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _lazy_names(node: ast.AST) -> list[str]:
    """Modules named by string for a later import: `import_module("...")`, or a lazy table's
    values (`{"check": "mergekit_collapse.guard.assess"}`)."""
    if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("import_module"):
        strings = node.args[:1]
    elif isinstance(node, ast.Dict):
        strings = node.values
    else:
        return []
    return [s.value for s in strings if isinstance(s, ast.Constant) and isinstance(s.value, str)]


def _imports(path: Path, *, runtime: bool = False) -> list[tuple[int, str]]:
    """Every `(line, module)` the file imports from the package: absolute and relative imports,
    `from mergekit_collapse import x` (the submodule x, or the package root itself), imports inside
    functions, and modules named by string (`import_module("mergekit_collapse.x")`, lazy tables).
    `runtime`: leave out imports under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module_name(path)
    known = set(_modules())
    skip = _type_checking_lines(tree) if runtime else set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(me, node)
            if target is None:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found += [(node.lineno, s) for s in subs]
            if len(subs) < len(node.names):  # names from the module itself
                found.append((node.lineno, target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        found += [(node.lineno, name) for name in _lazy_names(node) if name in known]
    return [(line, m) for line, m in found
            if m.partition(".")[0] == "mergekit_collapse" and line not in skip]


def upward_imports() -> list[str]:
    """Every `file:line imports module` where a lower part imports a higher one, or any module
    imports the package root (which re-exports the public API lazily, from the top layers)."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _part(_module_name(path))
        if me is None:  # the package's __init__ re-exports the public API lazily
            continue
        for line, target in _imports(path):
            other = _part(target)
            if other is None or RANK[other] > RANK[me]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return bad


def import_cycles() -> list[list[str]]:
    """The import cycles among the package's modules (strongly connected components of the
    runtime import graph, lazy imports and the root's lazy table included), each sorted."""
    modules = _modules()
    graph = {m: sorted({t for _, t in _imports(p, runtime=True) if t in modules and t != m})
             for m, p in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for m in graph:
        if m not in index:
            visit(m)
    return sorted(cycles)


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts == set(RANK), "add the new part to LAYERS (and to the README's Layout)"


def test_imports_only_go_down_the_pipeline():
    assert upward_imports() == []


def test_no_import_cycles():
    """Not between parts, nor inside one (e.g. actions/base.py <-> actions/builtin.py)."""
    assert import_cycles() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The walk sees imports inside functions too (a lazy import is still a dependency)."""
    fake = tmp_path / "mergekit_collapse"
    (fake / "guard").mkdir(parents=True)
    (fake / "guard" / "x.py").write_text("def f():\n    from mergekit_collapse.cli import main\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert upward_imports() == ["mergekit_collapse/guard/x.py:2 imports mergekit_collapse.cli"]


def test_the_checks_see_root_relative_and_circular_imports(tmp_path, monkeypatch):
    """`from mergekit_collapse import __version__`, relative imports, a lazy import back: seen."""
    fake = tmp_path / "mergekit_collapse"
    (fake / "actions").mkdir(parents=True)
    (fake / "__init__.py").write_text("LAZY = {'x': 'mergekit_collapse.actions.b'}\n")
    (fake / "actions" / "__init__.py").write_text("")
    (fake / "actions" / "a.py").write_text("from mergekit_collapse import __version__\n"
                                            "def f():\n    from . import b\n")
    (fake / "actions" / "b.py").write_text("from .a import f\nfrom ..actions import a\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert upward_imports() == ["mergekit_collapse/actions/a.py:1 imports mergekit_collapse"]
    assert import_cycles() == [["mergekit_collapse", "mergekit_collapse.actions.a",
                                "mergekit_collapse.actions.b"]]


def test_public_api_is_importable_without_torch():
    code = ("import sys, mergekit_collapse as m; assert 'torch' not in sys.modules; "
            "[getattr(m, n) for n in m.__all__]; print('torch' in sys.modules)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # every name resolves; torch loads only when a model does


def test_the_tests_mirror_the_package():
    """A folder of tests per part of the package (the root modules' tests at the top); helpers and
    data at the top too, or under the part that uses them."""
    tests = Path(__file__).parent
    parts = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and p.name not in
               ("__pycache__", "mergekit_suite", ".hypothesis")}
    assert folders <= parts, f"tests/{sorted(folders - parts)} names no part of the package"
    tested = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert parts - tested <= {"schemas"}, f"no tests/ folder for {sorted(parts - tested)}"
