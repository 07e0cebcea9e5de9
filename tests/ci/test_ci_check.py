"""`check` over many configs on tiny real models: one verdict, exit precedence, --changed-since in a
real git repository, GitHub workflow commands / job summary / outputs, and SARIF 2.1.0."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from ci_common import BROKEN, RISKY_LINES, cli, git, init_repo, make_repo

DATA = Path(__file__).parent / "data"
ANNOTATION = re.compile(r"^::(error|warning) file=([^,]+),line=(\d+),endLine=(\d+),col=(\d+),"
                        r"endColumn=(\d+),title=([^:]+)::(.+)$")


@pytest.fixture
def repo(tiny_zoo, tmp_path, monkeypatch):
    root = make_repo(tmp_path / "recipes", tiny_zoo)
    monkeypatch.chdir(root)
    return root


def outputs(path: Path) -> dict[str, str]:
    """Parse a $GITHUB_OUTPUT file written in the `name<<DELIMITER` form."""
    pattern = re.compile(r"^([\w-]+)<<(\S+)\n(.*?)\n\2$", flags=re.M | re.S)
    return {m.group(1): m.group(3) for m in pattern.finditer(path.read_text())}


def test_many_configs_one_verdict_and_exit_precedence(repo):
    res = cli("check", "configs/risky.yml", "configs/calm.yml", "--no-progress")
    assert res.exit_code == 3, res.output
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[1:]}
    assert rows["configs/risky.yml"][1:3] == ["collapse", "collapse"]
    assert rows["configs/calm.yml"][1] == "mergeable"
    # calm's models and probes were all extracted for risky: the cache serves them
    assert rows["configs/calm.yml"][-2:] == ["3/3", "0"] and rows["configs/risky.yml"][-1] == "3"

    assert cli("check", "configs/calm.yml", "--no-progress").exit_code == 0
    assert cli("check", "configs/calm.yml", "--fail-on", "elevated", "--no-progress").exit_code == 3
    assert cli("check", "configs/*.yml", "--fail-on", "never", "--no-progress").exit_code == 0

    (repo / "configs" / "broken.yml").write_text(BROKEN)
    res = cli("check", "configs", "--no-progress")  # a folder: every guarded config in it
    assert res.exit_code == 2, res.output  # a broken recipe outranks a risky one
    assert "did you mean 'tasks'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert [line.split()[0] for line in res.stdout.splitlines()[1:]] == [
        "configs/broken.yml", "configs/calm.yml", "configs/risky.yml"]
    assert cli("check", "configs", "--fail-on", "never", "--no-progress").exit_code == 2
    res = cli("check", "recipes/*.yml")
    assert res.exit_code == 2 and "no file matches 'recipes/*.yml'" in res.stderr


def test_folders_skip_yaml_that_is_not_a_guarded_config(repo):
    wf = repo / ".github" / "workflows"
    wf.mkdir(parents=True)
    (wf / "ci.yml").write_text("on: push\njobs: {}\n")
    (repo / "configs" / "tasks.yaml").write_text("task: tiny\ndataset_path: json\n")
    (repo / "configs" / "plain.yml").write_text("merge_method: linear\nmodels: [{model: a/b}]\n")
    res = cli("check", ".", "--no-progress", "--format", "json")
    assert res.exit_code == 3, res.output
    assert [c["config"] for c in json.loads(res.stdout)["configs"]] == [
        "configs/calm.yml", "configs/risky.yml"]
    assert "skipped 2 YAML file(s)" in res.stderr  # tasks.yaml, plain.yml; .github is not searched
    # a named file is checked as given unless --only-guarded (what the pre-commit hook passes)
    assert cli("check", "configs/plain.yml").exit_code == 2
    res = cli("check", "--only-guarded", "configs/plain.yml", "configs/tasks.yaml")
    assert res.exit_code == 0 and "no config to check" in res.stdout


def test_changed_since_checks_only_what_the_diff_touches(tiny_zoo, tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "recipes", tiny_zoo, copy_models=("ft2",))
    (repo / "configs" / "broken.yml").write_text(BROKEN.replace("taks", "tasks"))
    init_repo(repo)
    monkeypatch.chdir(repo)

    res = cli("check", "configs", "--changed-since", "HEAD", "--no-progress")
    assert res.exit_code == 0 and "0 of 3 config(s) touched" in res.stderr

    # a PR branch edits one recipe: only that one is checked (it is mergeable)
    git(repo, "checkout", "-q", "-b", "pr")
    (repo / "configs" / "calm.yml").write_text(
        (repo / "configs" / "calm.yml").read_text() + "# edited\n")
    git(repo, "commit", "-qam", "edit calm")
    res = cli("check", "configs", "--changed-since", "main", "--no-progress", "--format", "json")
    assert res.exit_code == 0, res.output
    assert [c["config"] for c in json.loads(res.stdout)["configs"]] == ["configs/calm.yml"]

    # main moves on after the branch point: its changes are not this PR's (merge-base diff)
    git(repo, "checkout", "-q", "main")
    (repo / "configs" / "risky.yml").write_text(
        (repo / "configs" / "risky.yml").read_text() + "# main\n")
    git(repo, "commit", "-qam", "main edits risky")
    git(repo, "checkout", "-q", "pr")
    res = cli("check", "configs", "--changed-since", "main", "--no-progress", "--format", "json")
    assert [c["config"] for c in json.loads(res.stdout)["configs"]] == ["configs/calm.yml"]

    # a local model a recipe reads changes (uncommitted): calm and risky read zoo/ft2
    cfg = repo / "zoo" / "ft2" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    res = cli("check", "configs", "--changed-since", "main", "--no-progress", "--format", "json")
    assert res.exit_code == 3, res.output
    assert [c["config"] for c in json.loads(res.stdout)["configs"]] == [
        "configs/calm.yml", "configs/risky.yml"]

    res = cli("check", "configs", "--changed-since", "no-such-ref")
    assert res.exit_code == 2 and "--changed-since" in res.stderr


def test_github_format_annotations_summary_outputs(repo, tmp_path):
    (repo / "configs" / "broken.yml").write_text(BROKEN)
    summary, out = tmp_path / "summary.md", tmp_path / "output.txt"
    env = {"GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(out),
           "GITHUB_WORKSPACE": str(repo)}
    res = cli("check", "configs/risky.yml", "configs/calm.yml", "configs/broken.yml", "--format",
              "github", "--no-progress", "--out", tmp_path / "reports", env=env)
    assert res.exit_code == 2, res.output
    found = [ANNOTATION.match(line) for line in res.stdout.splitlines()
             if line.startswith(("::error ", "::warning "))]
    assert all(found), res.stdout
    by_file: dict[str, list] = {}
    for m in found:
        by_file.setdefault(m.group(2), []).append(m)
    risky = by_file["configs/risky.yml"]
    assert [(m.group(1), int(m.group(3)), int(m.group(5))) for m in risky] == [
        ("error", *RISKY_LINES[name]) for name in ("./zoo/ft1", "./zoo/ft2", "./zoo/ft3")]
    assert all("would collapse" in m.group(7) and "collapse band" in m.group(8) for m in risky)
    calm = by_file["configs/calm.yml"]  # mergeable: a band is a warning, not an error
    assert [(m.group(1), int(m.group(3))) for m in calm] == [("warning", 4), ("warning", 6)]
    (broken,) = by_file["configs/broken.yml"]
    assert (broken.group(1), broken.group(3)) == ("error", "6")
    assert "did you mean 'tasks'" in broken.group(8)

    text = summary.read_text()
    assert text.startswith("## ❌ mergekit-collapse: error (3 configs, 2 failing)")
    assert re.search(r"^\| `configs/risky\.yml` \| ⛔ collapse \| collapse \| \w+ "
                     r"\| one, two, three \| 3 \|$",
                     text, flags=re.M), text
    assert "| converse Δ²/4 (no merge does better) |" in text  # the bounds
    assert "| `./zoo/ft3` | three |" in text  # the per-model risk table
    assert "**What `guard.action: abort` would do** (nothing was merged):" in text
    assert "- **merge stopped; no output written** — predicted collapse" in text
    assert outputs(out) == {"verdict": "error", "worst-band": "collapse",
                            "report-path": str((tmp_path / "reports").resolve()), "exit-code": "2"}
    reports = tmp_path / "reports"
    risky_report = json.loads((reports / "configs_risky" / "report.json").read_text())
    assert risky_report["verdict"] == "collapse"
    assert json.loads((reports / "summary.json").read_text())["exit_code"] == 2
    assert (reports / "summary.md").read_text() == text

    # an explicit budget asks for the bounds alone: the set's outlier (ft3) carries the error
    res = cli("check", "configs/risky.yml", "--absolute-budget", "1e-6", "--format", "github",
              "--no-progress", env={**env, "GITHUB_STEP_SUMMARY": "", "GITHUB_OUTPUT": ""})
    assert res.exit_code == 3
    line, col = RISKY_LINES["./zoo/ft3"]
    (outlier,) = [m for m in map(ANNOTATION.match, res.stdout.splitlines())
                  if m and "outlier" in m.group(8)]
    assert (outlier.group(1), int(outlier.group(3)), int(outlier.group(5))) == ("error", line, col)
    assert "The set is over budget" in outlier.group(8)


def test_sarif_validates_against_the_2_1_0_schema(repo):
    import jsonschema

    (repo / "configs" / "broken.yml").write_text(BROKEN)
    res = cli("check", "configs/risky.yml", "configs/calm.yml", "configs/broken.yml", "--format",
              "sarif", "--no-progress")
    assert res.exit_code == 2
    log = json.loads(res.stdout)
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text())
    jsonschema.Draft4Validator(schema).validate(log)
    results = log["runs"][0]["results"]
    # one result per flagged model, plus the broken config
    assert [(r["ruleId"], r["level"], r["locations"][0]["physicalLocation"]["region"]["startLine"])
            for r in results] == [
        ("collapse-band", "error", 6), ("collapse-band", "error", 8), ("collapse-band", "error", 9),
        ("collapse-band", "warning", 4), ("collapse-band", "warning", 6),
        ("bad-config", "error", 6)]
    location = results[0]["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "configs/risky.yml"
    assert results[2]["properties"]["task"] == "three"
    # a SARIF log that breaks the schema is caught (the validation can fail)
    log["runs"][0]["results"][0]["level"] = "fatal"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(log)
