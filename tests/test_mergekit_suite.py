"""MergeKit stays intact: its own test suite passes with mergekit-collapse installed, hook active.

The suite is vendored from the mergekit 0.1.5 sdist in tests/mergekit_suite (origin, license and
the reconstructed tests/common.py: its README). It runs against whatever mergekit is installed
within the declared range (`mergekit>=0.1.5`); outside it the test fails, never skips. It runs in a
subprocess, from a copy in a temporary folder, so neither this project's conftest nor its
`tests/common.py` is on its path; a conftest written there first asserts that the `.pth` import hook
is installed and has added `--guard` to `mergekit-yaml`.

CI time: by default the real-size GPT-2 tests (`make_gpt2size`: 124M parameters, ~0.5 GB written
per merge) are left out; every other test of the suite runs. MERGEKIT_SUITE=all runs them too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

#: the release the vendored suite comes from (tests/mergekit_suite/README.md)
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


def supported_mergekit() -> Requirement:
    """The mergekit requirement this package declares (pyproject: `mergekit>=0.1.5`)."""
    return next(r for r in map(Requirement, requires("mergekit-collapse") or [])
                if r.name == "mergekit" and not r.marker)


def check_supported(installed: str) -> None:
    """Fail loudly when the installed mergekit is outside the declared range (never a silent skip);
    any supported release runs the vendored suite, which is its own oldest supported one."""
    req = supported_mergekit()
    if not req.specifier.contains(Version(installed), prereleases=True):
        pytest.fail(f"mergekit {installed} is installed, but mergekit-collapse requires {req}: "
                    "install a supported mergekit to run its own test suite")
    assert req.specifier.contains(MERGEKIT_VERSION), (f"the vendored suite ({MERGEKIT_VERSION}) "
                                                      f"is not {req}")


def test_the_vendored_suite_runs_on_any_supported_mergekit():
    """No silent skip (issue 23): the declared range is checked here, on every run; the suite
    itself (slow) then runs against whatever supported mergekit is installed."""
    check_supported(version("mergekit"))
    with pytest.raises(pytest.fail.Exception, match="requires mergekit>=0.1.5"):
        check_supported("0.1.4")
    check_supported("0.2.0")  # a newer release runs the 0.1.5 suite; a break there fails the test


@pytest.mark.slow
def test_mergekit_own_suite_passes_with_the_hook_installed(tmp_path):
    check_supported(version("mergekit"))
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
