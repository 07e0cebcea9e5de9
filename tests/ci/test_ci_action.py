"""action.yml: a composite action whose `run:` steps are run here with bash, as the runner would,
in a workspace of tiny real models; the README's workflow is the one exercised. Inputs reach the
shell only as environment variables, so none of them can inject a command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from ci_common import RISKY_LINES, init_repo, make_repo, project_copy

ROOT = Path(__file__).parents[2]
EXPR = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


def readme_workflow() -> dict:
    """The first workflow in the README (a YAML block with `runs-on:`)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return yaml.safe_load(next(b for b in blocks if "runs-on:" in b))


class Runner:
    """Runs a composite action's steps the way the Actions runner does: `shell: bash` is
    `bash --noprofile --norc -eo pipefail <script>`, inputs come from `${{ inputs.* }}` in
    `env:`."""

    def __init__(self, action_dir: Path, workspace: Path, tmp: Path):
        self.action_dir, self.workspace, self.tmp = action_dir, workspace, tmp
        self.action = yaml.safe_load((action_dir / "action.yml").read_text())
        venv = tmp / "runner-python"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        self.env = {
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            # the dependencies are this environment's (a runner would have them from its pip cache);
            # the package itself is installed for real by the action's own install step
            "PYTHONPATH": sysconfig.get_paths()["purelib"],
            "HOME": os.environ.get("HOME", str(tmp)),
            "MERGEKIT_COLLAPSE_CACHE": str(tmp / "cache"),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "GITHUB_ACTION_PATH": str(action_dir), "GITHUB_WORKSPACE": str(workspace),
            "GITHUB_STEP_SUMMARY": str(tmp / "step_summary.md"), "RUNNER_TEMP": str(tmp / "runner"),
        }
        (tmp / "runner").mkdir(exist_ok=True)

    def run(self, inputs: dict[str, str], only: str | None = None) -> tuple[int, str, dict]:
        """Run the steps (or only the step named `only`); stop at the first failure like a job."""
        spec = self.action["inputs"]
        values = {k: str(v.get("default", "")) for k, v in spec.items()} | inputs
        out, outputs, code = "", {}, 0
        for k, step in enumerate(self.action["runs"]["steps"]):
            if "uses" in step or (only and step["name"] != only):
                continue
            env = {name: self.expand(str(value), values)
                   for name, value in step.get("env", {}).items()}
            outfile = self.tmp / f"output-{k}.txt"
            outfile.write_text("")
            script = self.tmp / f"step-{k}.sh"
            script.write_text(step["run"])
            res = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                                 cwd=self.workspace, capture_output=True, text=True, timeout=600,
                                 env={**self.env, **env, "GITHUB_OUTPUT": str(outfile)})
            out += res.stdout + res.stderr
            outputs[step.get("id", k)] = parse_outputs(outfile.read_text())
            code = res.returncode
            if code:
                break
        action_outputs = {name: self.expand(o["value"], values, outputs)
                          for name, o in self.action["outputs"].items()}
        return code, out, action_outputs

    @staticmethod
    def expand(text: str, inputs: dict[str, str], steps: dict | None = None) -> str:
        def one(m: re.Match) -> str:
            expr = m.group(1)
            if expr.startswith("inputs."):
                return inputs[expr.removeprefix("inputs.")]
            step, _, name = expr.removeprefix("steps.").partition(".outputs.")
            assert steps is not None and expr.startswith("steps."), f"unexpected expression {expr}"
            return steps.get(step, {}).get(name, "")
        return EXPR.sub(one, text)


def parse_outputs(text: str) -> dict[str, str]:
    pattern = re.compile(r"^([\w-]+)<<(\S+)\n(.*?)\n\2$", flags=re.M | re.S)
    return {m.group(1): m.group(3) for m in pattern.finditer(text)}


def test_action_metadata_is_a_well_kept_composite_action():
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    assert set(action["inputs"]) == {"configs", "budget", "fail-on", "changed-since", "cache-dir",
                                     "python-version", "pip-args", "summary"}
    for name, spec in action["inputs"].items():
        assert name == name.lower() and "default" in spec and spec["description"]
    assert set(action["outputs"]) == {"verdict", "worst-band", "report-path"}
    steps = action["runs"]["steps"]
    assert steps[0]["uses"].startswith("actions/setup-python@")
    for step in steps[1:]:
        assert step["shell"] == "bash"
        assert "${{" not in step["run"], "inputs are never interpolated into shell text"
        for value in step.get("env", {}).values():
            assert re.fullmatch(r"\$\{\{ inputs\.[\w-]+ \}\}", value)


@pytest.fixture(scope="module")
def runner(tiny_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("action")
    workspace = make_repo(tmp / "workspace", tiny_zoo)
    init_repo(workspace)  # a checkout
    return Runner(project_copy(tmp / "mergekit-collapse"), workspace, tmp)


def test_readme_workflow_runs_the_action(runner):
    workflow = readme_workflow()
    (job,) = workflow["jobs"].values()
    (step,) = [s for s in job["steps"] if "mergekit-collapse@" in s.get("uses", "")]
    code, log, outputs = runner.run({k: str(v) for k, v in (step.get("with") or {}).items()})
    assert code == 3, log  # risky.yml would collapse: the job fails
    assert "Successfully installed mergekit-collapse" in log
    # the installed package (not this checkout) ships the JSON Schemas editors point at
    probe = ("from mergekit_collapse.schemas import shipped_path; p = shipped_path('guard'); "
             "assert p.is_file() and 'site-packages' in str(p), p")
    subprocess.run(["python", "-c", probe], env=runner.env, cwd=runner.tmp, check=True, timeout=120)
    for name, (line, col) in RISKY_LINES.items():
        assert re.search(rf"^::error file=configs/risky\.yml,line={line},endLine={line},col={col},"
                         r"endColumn=\d+,title=mergekit-collapse%3A \w+ would "
                         rf"collapse::{re.escape(name)} ",
                         log, flags=re.M), log
    assert re.search(r"^::warning file=configs/calm\.yml,line=4,", log, flags=re.M)
    summary = (runner.tmp / "step_summary.md").read_text()
    assert summary.startswith("## ⛔ mergekit-collapse: collapse (2 configs, 1 failing)")
    assert "| `configs/calm.yml` | ✅ mergeable |" in summary
    assert "**What `guard.action: abort` would do**" in summary
    assert outputs["verdict"] == "collapse" and outputs["worst-band"] == "collapse"
    report = Path(outputs["report-path"])
    assert report == runner.tmp / "runner" / "mergekit-collapse"
    assert ((report / "configs_risky" / "report.json").is_file()
            and (report / "results.sarif").is_file())
    (runner.tmp / "step_summary.md").write_text("")

    # fail-on never: the same findings, a green step; summary off
    code, log, outputs = runner.run({"fail-on": "never", "summary": "false"}, only="Check configs")
    assert code == 0 and "::error file=configs/risky.yml" in log
    assert outputs["verdict"] == "collapse" and (runner.tmp / "step_summary.md").read_text() == ""


@pytest.mark.parametrize("inputs", [
    {"configs": 'configs/calm.yml"; touch pwned; echo "', "summary": 'false"; touch pwned; "',
     "cache-dir": "$(touch pwned)"},
    {"budget": "0.5; touch pwned"},
    {"changed-since": "$(touch pwned)"},
    {"fail-on": "never`touch pwned`"},
    {"pip-args": "$(touch pwned)"},
], ids=["configs+summary+cache-dir", "budget", "changed-since", "fail-on", "pip-args"])
def test_inputs_cannot_inject_shell(runner, inputs):
    only = None if "pip-args" in inputs else "Check configs"
    code, log, _ = runner.run(inputs, only=only)
    assert {"configs": "config file not found: configs/calm.yml\";", "budget": "not a valid float",
            "changed-since": "unknown git ref '$(touch pwned)'", "fail-on": "is not one of",
            "pip-args": "Invalid requirement"}[next(iter(inputs))] in log, log
    # each is refused as a bad value
    # (a missing file, a bad number, ref or choice, a bad requirement)
    assert code == (1 if only is None else 2), log
    assert not list(runner.tmp.rglob("pwned*")) and not list(Path.cwd().glob("pwned*")), log
