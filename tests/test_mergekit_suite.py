"""MergeKit stays intact: its own test suite passes with mergekit-collapse installed, hook active.

The suite is vendored from the mergekit 0.1.5 sdist in tests/mergekit_suite (origin, license and
the reconstructed tests/common.py: its README). It runs in a subprocess, from a copy in a temporary
folder, so neither this project's conftest nor its `tests/common.py` is on its path; a conftest
written there first asserts that the `.pth` import hook is installed and has added `--guard` to
`mergekit-yaml`.

CI time: by default the real-size GPT-2 tests (`make_gpt2size`: 124M parameters, ~0.5 GB written
per merge) are left out; every other test of the suite runs. MERGEKIT_SUITE=all runs them too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

MERGEKIT_VERSION = "0.1.5"
SUITE = Path(__file__).parent / "mergekit_suite"
#: the default selection (pytest -k): all but the real-size GPT-2 merges, for CI time
DEFAULT_SELECTION = "not gpt2"

HOOK_CONFTEST = '''
import sys
from pathlib import Path


def pytest_sessionstart(session):
    finders = [type(f).__name__ for f in sys.meta_path]
    assert "GuardFinder" in finders, f"mergekit-collapse's import hook is not installed: {finders}"
    import mergekit.scripts.run_yaml as run_yaml
    from mergekit_collapse.cli.mergekit_yaml import GUARD_PARAM_NAMES

    names = {p.name for p in run_yaml.main.params}
    assert set(GUARD_PARAM_NAMES) <= names, f"mergekit-yaml has no guard options: {sorted(names)}"
    (Path(__file__).parent / "hook_active").write_text("yes")
'''


@pytest.mark.slow
def test_mergekit_own_suite_passes_with_the_hook_installed(tmp_path):
    if version("mergekit") != MERGEKIT_VERSION:
        pytest.skip(f"the vendored suite is mergekit {MERGEKIT_VERSION}'s; "
                    f"mergekit {version('mergekit')} is installed")
    shutil.copytree(SUITE / "tests", tmp_path / "tests")
    (tmp_path / "conftest.py").write_text(HOOK_CONFTEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # rootdir here: not this project's settings
    selection = [] if os.environ.get("MERGEKIT_SUITE") == "all" else ["-k", DEFAULT_SELECTION]
    env = {k: v for k, v in os.environ.items() if k != "MERGEKIT_COLLAPSE_DISABLE"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short",
         "-W", "ignore::DeprecationWarning", *selection, "tests"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert (tmp_path / "hook_active").exists(), tail
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and " failed" not in res.stdout, tail
