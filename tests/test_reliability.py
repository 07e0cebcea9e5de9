"""Reliability round 2 (issue 23), the cases that are not one command and one stderr line: no
workflow command injected through a name, SARIF URIs, reports kept when one config fails, file modes
under the umask, the guard schema against the loader, and what the tests copy of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from ci_common import CALM, cli, project_copy

ROOT = Path(__file__).parent.parent
INJECT = "\n::warning title=INJECTED::boom"
#: the workflow commands our --format github may emit
OURS = {"error", "warning", "notice", "group", "endgroup", "stop-commands"}


def processed_commands(log: str) -> list[tuple[str, str]]:
    """The workflow commands GitHub's runner would process in `log`: (command, rest), honouring
    `::stop-commands::TOKEN` ... `::TOKEN::` as the runner does (leading whitespace is trimmed)."""
    found, stop = [], None
    for line in log.splitlines():
        text = line.lstrip()
        if stop is not None:
            if text == f"::{stop}::":
                stop = None
            continue
        m = re.match(r"^::([\w-]+)(.*)$", text)
        if m:
            if m.group(1) == "stop-commands":
                stop = m.group(2).removeprefix("::")
            found.append((m.group(1), m.group(2)))
    return found


def _calm_repo(root: Path, zoo: dict[str, Path], *, config: str = "calm.yml",
               folder: str = "ft2") -> Path:
    root.mkdir(parents=True)
    (root / "zoo").mkdir()
    for name in ("base", "ft1"):
        (root / "zoo" / name).symlink_to(zoo[name], target_is_directory=True)
    (root / "zoo" / folder).symlink_to(zoo["ft2"], target_is_directory=True)
    text = CALM.replace("./zoo/ft2", json.dumps(f"./zoo/{folder}"))  # JSON strings are YAML
    (root / config).write_text(text)
    return root


NAMES = {"config-name": dict(config="x%:," + INJECT + ".yml"),
         "model-folder": dict(folder="m%:," + INJECT)}


@pytest.mark.parametrize("where", sorted(NAMES))
@pytest.mark.parametrize("command", ["check", "validate"])
def test_no_workflow_command_injection_through_names(where, command, tiny_zoo, tmp_path,
                                                     monkeypatch):
    kw = {"config": "calm.yml", "folder": "ft2"} | NAMES[where]
    root = _calm_repo(tmp_path / "r", tiny_zoo, **kw)
    monkeypatch.chdir(root)
    summary, output = tmp_path / "summary.md", tmp_path / "output"
    env = {"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(output)}
    if command == "check":
        res = cli("check", kw["config"], "--no-progress", "--format", "github", env=env)
    else:  # something for validate to annotate: the model folder missing, or a typo in guard:
        if where == "model-folder":
            (root / "zoo" / kw["folder"]).unlink()
        else:
            (root / kw["config"]).write_text(
                (root / kw["config"]).read_text().replace("tasks:", "taks:"))
        res = cli("validate", kw["config"], "--format", "github", env=env)
    cmds = processed_commands(res.stdout) + processed_commands(res.stderr)
    assert cmds, res.output
    assert {c for c, _ in cmds} <= OURS, cmds
    assert not any(rest.lstrip().startswith("title=INJECTED") for _, rest in cmds), cmds
    for c, rest in cmds:
        if c in ("error", "warning", "notice"):
            props = rest.split("::", 1)[0]
            assert "\n" not in props and "file=" in props
            file = re.search(r"file=([^,]*)", props).group(1)
            assert "%0A" in file or where != "config-name", file  # the newline, escaped as data
            assert "%3A" in file or where != "config-name"  # ':' escaped as a property
            assert "%2C" in file or where != "config-name"


@pytest.mark.parametrize("name", ["wn/sp ace #1.yml", "a,b:c%d.yml", "new\nline.yml"])
def test_sarif_uris_are_percent_encoded(name, tiny_zoo, tmp_path, monkeypatch):
    root = _calm_repo(tmp_path / "r", tiny_zoo, config="calm.yml")
    target = root / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(root / "calm.yml", target)
    monkeypatch.chdir(root)
    res = cli("check", name, "--no-progress", "--format", "sarif", "--absolute-budget", "1e-9")
    uris = [loc["physicalLocation"]["artifactLocation"]["uri"]
            for r in json.loads(res.stdout)["runs"][0]["results"] for loc in r["locations"]]
    assert uris and set(uris) == {quote(name, safe="/")}, uris


def test_check_writes_the_reports_of_the_configs_that_ran(tiny_zoo, tmp_path, monkeypatch):
    root = _calm_repo(tmp_path / "r", tiny_zoo)
    monkeypatch.chdir(root)
    res = cli("check", "calm.yml", "n" * 300 + ".yml", "--no-progress", "--out", "out")
    assert res.exit_code == 2, res.output
    # + the "wrote" line
    assert len(res.stderr.strip().splitlines()) == 2 and "too long" in res.stderr
    assert (root / "out" / "summary.json").is_file()
    assert next((root / "out").glob("calm*/report.json"), None) is not None


def test_card_files_respect_the_umask(tmp_path):
    from reports import make_merged_dir

    out = make_merged_dir(tmp_path)
    old = os.umask(0o022)
    try:
        res = cli("card", out)
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    for path in [out / "README.md", *(out / "mergeability").glob("report.*"),
                 *(out / ".eval_results").glob("*.yaml")]:
        assert path.stat().st_mode & 0o777 == 0o644, path


@pytest.mark.parametrize("guard", [
    {"budget": {"relative": 1, "absolute": 1}},
    {"tasks": {}},
    {"action": "abrot"},
], ids=["budget-both", "tasks-empty", "action-typo"])
def test_the_guard_schema_rejects_what_the_loader_rejects(guard):
    import jsonschema

    from mergekit_collapse.errors import ConfigError
    from mergekit_collapse.guard.config import parse_config

    res = cli("schema", "guard")
    assert res.exit_code == 0
    schema = json.loads(res.stdout)
    tasks = {"org/a": {"name": "a", "probes": ["x"]}}
    full = {"tasks": tasks} | guard
    cfg = {"merge_method": "linear", "models": [{"model": "org/a", "parameters": {"weight": 1}}],
           "guard": full}
    if "tasks" in guard:  # parses; `check` and `validate` reject it (no task for the models)
        assert not parse_config(yaml.safe_dump(cfg)).guard.tasks
    else:
        with pytest.raises(ConfigError):
            parse_config(yaml.safe_dump(cfg))
    jsonschema.validate({**cfg, "guard": {"tasks": tasks}}, schema)  # the valid twin passes
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, schema)


def test_the_demo_output_never_reaches_what_tests_copy(tmp_path):
    ignored = subprocess.run(["git", "check-ignore", "-q",
                              "mergekit-collapse-demo/model.safetensors"],
                             cwd=ROOT, check=False)
    assert ignored.returncode == 0, ".gitignore must ignore mergekit-collapse-demo/"
    demo = ROOT / "mergekit-collapse-demo"
    made = not demo.exists()
    marker = demo / "zzz-test-marker.txt"
    demo.mkdir(exist_ok=True)
    marker.write_text("the demo's output")
    stray = ROOT / "zzz-untracked-stray.txt"  # untracked and not ignored: not published either
    stray.write_text("scratch")
    try:
        dest = project_copy(tmp_path / "copy")
    finally:
        marker.unlink()
        stray.unlink()
        if made:
            shutil.rmtree(demo, ignore_errors=True)
    assert not (dest / "mergekit-collapse-demo").exists()
    assert not (dest / stray.name).exists()
    assert (dest / "pyproject.toml").is_file()


def test_ci_runs_the_fast_demo_before_the_tests():
    script = (ROOT / ".ci" / "run").read_text()
    assert "mergekit-collapse demo --fast" in script or "demo --fast" in script
    assert script.index("demo") < script.index("pytest")


def test_hypothesis_is_derandomised_by_default():
    from hypothesis import settings

    assert settings().derandomize, "tests/conftest.py loads a derandomised hypothesis profile"


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="root writes through file modes: nothing is read-only")
def test_a_warm_read_only_cache_still_serves(tiny_zoo, tmp_path, monkeypatch):
    root = _calm_repo(tmp_path / "r", tiny_zoo)
    monkeypatch.chdir(root)
    cache = tmp_path / "cache"
    assert cli("check", "calm.yml", "--no-progress").exit_code == 0  # fills the cache
    modes = {}
    for p in [cache, *cache.rglob("*")]:
        modes[p] = p.stat().st_mode
        p.chmod(modes[p] & ~0o222)
    try:
        res = cli("check", "calm.yml", "--no-progress")
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert res.exit_code == 0 and not res.stderr.strip(), res.output


def test_card_is_written_all_or_nothing(tmp_path):
    """One .eval_results file that cannot be written (a folder of the user's in its place): the
    README and every other file stay as they were, and the error is one line."""
    from reports import make_merged_dir

    from mergekit_collapse.publish.card import read_evaluation
    from mergekit_collapse.publish.eval_results import EVAL_RESULTS_DIR, plan_eval_results

    out = make_merged_dir(tmp_path)
    planned = sorted(p for p, data in plan_eval_results(
        out, read_evaluation(out / "mergeability" / "evaluation.json")).items() if data is not None)
    assert len(planned) >= 2
    planned[-1].mkdir(parents=True)  # the last file to write is in the way
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = cli("card", out)
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "nothing was changed" in res.stderr
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in (out / EVAL_RESULTS_DIR).iterdir()) == [planned[-1].name]


@pytest.mark.parametrize("var", ["GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT"])
def test_an_unwritable_github_file_keeps_the_verdicts_exit_code(var, tiny_zoo, tmp_path,
                                                                monkeypatch):
    root = _calm_repo(tmp_path / "r", tiny_zoo)
    monkeypatch.chdir(root)
    (tmp_path / "a_file").write_text("in the way")
    res = cli("check", "calm.yml", "--no-progress", "--format", "github", "--absolute-budget",
              "1e-9", env={var: str(tmp_path / "a_file" / "x")})
    assert res.exit_code == 3, res.output  # the verdict (over budget), not 1
    assert "Traceback" not in res.output
