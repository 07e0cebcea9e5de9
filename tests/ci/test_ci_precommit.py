"""The pre-commit hooks through pre-commit itself (from PyPI): `try-repo` on a temporary merging
repository, and the README's `.pre-commit-config.yaml` snippet with `pre-commit run`.

pre-commit builds its own environment and installs this package into it for real (`pip install .`
of a committed copy of the project). Its dependencies (torch, mergekit, ...) come from this test
environment through PYTHONPATH, so pip finds them already satisfied instead of spending minutes
reinstalling them; a user's first run pays that install once, then pre-commit reuses it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from ci_common import (
    BROKEN_KINDS,
    CALM,
    NOT_CONFIGS,
    RISKY,
    VALID,
    git,
    init_repo,
    project_copy,
    write_files,
)

ROOT = Path(__file__).parents[2]
PRE_COMMIT = Path(sys.executable).parent / "pre-commit"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return project_copy(tmp_path_factory.mktemp("published") / "mergekit-collapse")


def pre_commit(repo: Path, *args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRE_COMMIT_HOME": str(home),
           "PYTHONPATH": sysconfig.get_paths()["purelib"],
           "MERGEKIT_COLLAPSE_CACHE": str(home / "mc-cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(PRE_COMMIT), *args], cwd=repo, capture_output=True, text=True,
                          env=env, timeout=600)


def recipes(root: Path, zoo: dict[str, Path], files: dict) -> Path:
    (root / "zoo").mkdir(parents=True)
    for name, path in zoo.items():
        (root / "zoo" / name).symlink_to(path, target_is_directory=True)
    write_files(root, files)
    init_repo(root)
    return root


def test_try_repo_validate_rejects_each_broken_config_in_one_line(project, tiny_zoo, tmp_path):
    repo = recipes(tmp_path / "recipes", tiny_zoo, {**BROKEN_KINDS, **NOT_CONFIGS, **VALID})
    res = pre_commit(repo, "try-repo", str(project), "mergekit-collapse-validate", "--all-files",
                     home=tmp_path / "pc")
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(r"^mergekit-collapse validate\.+Failed$", res.stdout, flags=re.M), res.stdout
    assert "- exit code: 2" in res.stdout
    lines = [line for line in res.stdout.splitlines() if re.match(r"^[\w.]+\.ya?ml:", line)]
    assert sorted(line.split(":", 1)[0] for line in lines) == sorted(BROKEN_KINDS)
    for line in lines:
        name = line.split(":", 1)[0]
        _, message, lineno = BROKEN_KINDS[name]
        assert line.startswith(f"{name}:{lineno}: ") and message in line, line


def test_readme_snippet_with_pre_commit_run(project, tiny_zoo, tmp_path):
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    snippet = yaml.safe_load(next(b for b in blocks if "mergekit-collapse-validate" in b))
    (entry,) = snippet["repos"]
    assert [h["id"] for h in entry["hooks"]] == ["mergekit-collapse-validate",
                                                 "mergekit-collapse-check"]
    # point the snippet at the local copy of the project, at its commit
    entry["repo"], entry["rev"] = str(project), git(project, "rev-parse", "HEAD").strip()
    repo = recipes(tmp_path / "recipes", tiny_zoo, {
        "calm.yml": CALM, "risky.yml": RISKY, **NOT_CONFIGS,
        ".pre-commit-config.yaml": yaml.safe_dump(snippet)})
    home = tmp_path / "pc"

    # pre-push runs both hooks: validate passes (other YAML skipped), check fails on risky.yml
    res = pre_commit(repo, "run", "--all-files", "--hook-stage", "pre-push", home=home)
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(r"^mergekit-collapse validate\.+Passed$", res.stdout, flags=re.M), res.stdout
    assert (re.search(r"mergekit-collapse check\.+Failed", res.stdout)
            and "- exit code: 3" in res.stdout)
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()
            if line.startswith(("calm.yml", "risky.yml"))}
    assert rows["risky.yml"][1] == "collapse" and rows["calm.yml"][1] == "mergeable", res.stdout
    # the workflow, multi-document, !Ref and .pre-commit-config.yaml files are not recipes
    assert "skipped 4 YAML file(s)" in res.stdout
