"""The package's imports only go down the pipeline (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import mergekit_collapse

PACKAGE = Path(mergekit_collapse.__file__).parent

#: top-level parts of the package, lowest first: a module may import its own part or a lower one
LAYERS = [
    ("errors", "_constants", "_console", "_io"),
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


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if node.module == "mergekit_collapse" and a.name in RANK]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m.startswith("mergekit_collapse.")]


def upward_imports() -> list[str]:
    """Every `file:line imports module` where a lower part imports a higher one."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _part(_module_name(path))
        if me is None:  # the package's __init__ re-exports the public API lazily
            continue
        for line, target in _imports(path):
            other = _part(target)
            if other is not None and RANK[other] > RANK[me]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return bad


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts == set(RANK), "add the new part to LAYERS (and to the README's Layout)"


def test_imports_only_go_down_the_pipeline():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The walk sees imports inside functions too (a lazy import is still a dependency)."""
    fake = tmp_path / "mergekit_collapse"
    (fake / "guard").mkdir(parents=True)
    (fake / "guard" / "x.py").write_text("def f():\n    from mergekit_collapse.cli import main\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert upward_imports() == ["mergekit_collapse/guard/x.py:2 imports mergekit_collapse.cli"]


def test_public_api_is_importable_without_torch():
    code = ("import sys, mergekit_collapse as m; assert 'torch' not in sys.modules; "
            "[getattr(m, n) for n in m.__all__]; print('torch' in sys.modules)")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # every name resolves; torch loads only when a model does
