"""A tiny model-merging repository for the CI tests: recipes over the `tiny_zoo`, good and
broken."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from click.testing import CliRunner, Result

#: risky.yml: the calibrated default budget; ft3 is far out, every model lands in the collapse band.
#: Comments, an anchor/alias, flow style: the annotation lines are asserted against RISKY_LINES.
RISKY = """\
# task arithmetic over three fine-tunes of one base
merge_method: task_arithmetic
base_model: ./zoo/base
x-weight: &w {weight: 0.3}
models:
  - model: ./zoo/ft1   # the first
    parameters: *w
  - {model: ./zoo/ft2, parameters: *w}
  - model: ./zoo/ft3
    parameters: *w
dtype: float32
guard:
  k: 2
  rehearse: "off"   # CI plumbing is under test here, not the in-memory rehearsal
  tasks:
    ./zoo/ft1: {name: one, probes: ["alpha beta", "gamma delta epsilon"]}
    ./zoo/ft2: {name: two, probes: ["zeta eta", "one two three"]}
    ./zoo/ft3: {name: three, probes: ["four five", "x y z"]}
"""
#: (line, column) of each constituent's reference in RISKY
RISKY_LINES = {"./zoo/ft1": (6, 12), "./zoo/ft2": (8, 13), "./zoo/ft3": (9, 12)}

#: calm.yml: a huge absolute budget, so the verdict is mergeable (bands are still reported)
CALM = """\
merge_method: task_arithmetic
base_model: ./zoo/base
models:
  - model: ./zoo/ft1
    parameters: {weight: 0.5}
  - model: ./zoo/ft2
    parameters: {weight: 0.5}
dtype: float32
guard:
  k: 2
  rehearse: "off"
  budget: {absolute: 1.0e9}
  tasks:
    ./zoo/ft1: {name: one, probes: ["alpha beta", "gamma delta epsilon"]}
    ./zoo/ft2: {name: two, probes: ["zeta eta", "one two three"]}
"""

BROKEN = ("merge_method: linear\nmodels:\n  - model: ./zoo/ft1\n    parameters: {weight: 1}\n"
          "guard:\n  taks: {}\n")


def make_repo(root: Path, zoo: dict[str, Path], *, copy_models: tuple[str, ...] = ()) -> Path:
    """`root/zoo/<name>` for every zoo model (symlinks; real copies for `copy_models`), and
    `configs/risky.yml`, `configs/calm.yml`."""
    (root / "zoo").mkdir(parents=True)
    for name, path in zoo.items():
        if name in copy_models:
            shutil.copytree(path, root / "zoo" / name)
        else:
            (root / "zoo" / name).symlink_to(path, target_is_directory=True)
    (root / "configs").mkdir()
    (root / "configs" / "risky.yml").write_text(RISKY)
    (root / "configs" / "calm.yml").write_text(CALM)
    return root


def git(root: Path, *args: str) -> str:
    """Run git in `root` with a fixed identity (no global config needed)."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    # no wall-clock limit: how long `git add` takes depends on the machine's load, not on a hang
    res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def init_repo(root: Path) -> None:
    """A git repository with everything in `root` committed."""
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "recipes")


def cli(*args: object, env: dict[str, str] | None = None) -> Result:
    """Our CLI in-process (click's runner: stdout and stderr apart)."""
    from mergekit_collapse.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def project_copy(dest: Path) -> Path:
    """The project as it would be published: its tracked files that are not ignored (as they are on
    disk), committed in a fresh repository (pre-commit try-repo and the action install from there).
    Nothing untracked comes along: not the demo's output, not a scratch file (`git add` a new file
    for these tests to see it)."""
    src = Path(__file__).parent.parent
    files = subprocess.run(["git", "ls-files", "--cached", "--exclude-standard", "-z"], cwd=src,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (src / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dest / name)
    init_repo(dest)
    return dest


_MODELS = "merge_method: linear\nmodels:\n  - model: ./zoo/ft1\n    parameters: {weight: 1}\n"
#: one config per kind of breakage the validate hook rejects: name -> (content, message, line)
BROKEN_KINDS = {
    "syntax.yml": ("merge_method: linear\nmodels: [\n", "malformed YAML", 3),
    "mergekit.yml": ("merge_method: linear\nmodels:\n  - parameters: {weight: 1}\n",
                     "invalid mergekit config: models.0.model: Field required", 3),
    "typo.yml": (_MODELS + "guard:\n  taks: {}\n", "did you mean 'tasks'", 6),
    "no_task.yml": (_MODELS + "  - model: ./zoo/ft2\n    parameters: {weight: 1}\nguard:\n"
                    "  tasks:\n    ./zoo/ft1: {name: one, probes: [hi]}\n",
                    "guard.tasks has no entry for model './zoo/ft2'", 5),
    "no_probes.yml": (_MODELS + "guard:\n  tasks:\n    ./zoo/ft1: {name: one}\n",
                      "has no probes", 7),
    "probe_file.yml": (_MODELS + "guard:\n  tasks:\n"
                       "    ./zoo/ft1: {name: one, probes: {file: p.jsonl}}\n",
                       "probe file 'p.jsonl' not found", 7),
    "missing_model.yml": (_MODELS.replace("ft1", "ft9") + "guard:\n  tasks:\n"
                          "    ./zoo/ft9: {name: one, probes: [hi]}\n",
                          "model './zoo/ft9' (models[0]) is a local path that does not exist", 3),
}
#: YAML the hook must leave alone, and configs it must pass
NOT_CONFIGS = {"workflow.yml": "on: push\njobs: {}\n", "multi.yaml": "a: 1\n---\nb: 2\n",
               "tags.yml": "Resources: !Ref Thing\n"}
VALID = {"good.yml": _MODELS + "guard:\n  tasks:\n    ./zoo/ft1: {name: one, probes: [hi]}\n",
         "unguarded.yml": _MODELS}


def write_files(root: Path, files: dict) -> None:
    for name, content in files.items():
        (root / name).write_text(content if isinstance(content, str) else content[0])
