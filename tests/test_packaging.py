"""What ships where: the runtime wheel holds the runtime; the zoos' data is a distribution of its
own (`zoo-data/`, `mergekit-collapse-zoo`), and without it the commands that need it say so in one
line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _shipped() -> list[Path]:
    """The tracked files of the runtime package that its wheel ships: the modules and the package
    data that pyproject.toml names."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["mergekit_collapse"]
    tracked = subprocess.run(["git", "ls-files", "mergekit_collapse"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    package = ROOT / "mergekit_collapse"
    return [ROOT / f for f in tracked if f.endswith(".py")
            or any((ROOT / f).relative_to(package).match(p.removeprefix("**/")) for p in patterns)]


def test_the_runtime_wheel_is_lean():
    """Under 2 MB before compression: no adapters, task data or other zoo files inside."""
    files = _shipped()
    assert files and all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) < 2_000_000
    assert not [f for f in files if f.suffix in (".safetensors", ".jsonl", ".gguf", ".bin")]


def test_without_the_zoo_data_the_zoo_commands_say_how_to_install_it(tmp_path):
    """The zoo's data distribution not installed (its import fails): exporting the zoo is refused
    in one line that names the install, exit 2."""
    code = ("import sys; sys.modules['mergekit_collapse_zoo'] = None\n"
            "from mergekit_collapse.cli import main\n"
            f"main(['zoo', 'export', {str(tmp_path / 'out')!r}])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert lines == ["error: the task zoo's data is not installed: pip install -e ./zoo-data "
                     "(from a checkout of mergekit-collapse; the README's install line does it)"]
    assert not (tmp_path / "out").exists()


def test_every_distribution_the_readme_installs_is_tracked():
    """Each `-e PATH` of the README's install lines is in git whole: its pyproject.toml and its
    package's modules are tracked, none of them ignored (a clean checkout can install it)."""
    lines = (ROOT / "README.md").read_text().splitlines()[3:5]
    paths = {re.sub(r"\[\w+\]", "", p.strip("'")) for line in lines
             for p in re.findall(r"-e (\S+)", line)}
    assert paths == {".", "./zoo-data"}
    for path in paths:
        folder = ROOT / path
        ignored = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard",
                                  "--", "pyproject.toml", "*/__init__.py"], cwd=folder,
                                 capture_output=True, text=True, check=True).stdout.split()
        assert [f for f in ignored if ".egg-info" not in f and ".venv" not in f] == []
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "pyproject.toml"],
                                 cwd=folder, capture_output=True, text=True)
        assert tracked.returncode == 0, f"{path}/pyproject.toml is not tracked"
