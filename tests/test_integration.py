"""`mergekit-yaml --guard` (the .pth hook on mergekit's own console script) and
`mergekit-collapse merge`.

Real subprocess runs on the tiny fixture models: the guard passes and merges; stops with exit 3 and
no output; without --guard the files equal plain mergekit's; the disable variable and a broken
hook leave plain mergekit working; `drop` end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent
MERGEKIT_YAML = str(BIN / "mergekit-yaml")
COLLAPSE = str(BIN / "mergekit-collapse")
# between the close pair's r*² (~1) and the outlier's Δ²/4 (~8) on the tiny zoo, at mean pooling
BUDGET = "3.0"


def config(zoo: dict[str, Path], names: list[str], **guard) -> dict:
    """A task_arithmetic config over tiny-zoo models, with inline probes."""
    probes = {"ft1": ["hello world", "what is 2+2?"], "ft2": ["translate cat", "the sky is"],
              "ft3": ["once upon", "def f():"]}
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "dtype": "float32",
        "models": [{"model": str(zoo[n]), "parameters": {"weight": 0.5}} for n in names],
        "guard": {"k": 2, "pooling": "mean",  # the pooling BUDGET was chosen for
                  "tasks": {str(zoo[n]): {"name": n, "probes": probes[n]} for n in names}, **guard},
    }


@pytest.fixture()
def configs(tiny_zoo: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, models in (("ok", ["ft1", "ft2"]), ("bad", ["ft1", "ft2", "ft3"])):
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(config(tiny_zoo, models), sort_keys=False))
        out[name] = path
    return out


def run(*args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(list(args), capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=300)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "mergeability" not in p.parts}


def test_guard_within_budget_merges(configs, tmp_path):
    out = tmp_path / "merged"
    res = run(MERGEKIT_YAML, str(configs["ok"]), str(out), "--guard",
              "--guard-absolute-budget", BUDGET, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "mergekit-collapse: mergeable" in res.stderr
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    report = json.loads((out / "mergeability" / "report.json").read_text())
    assert report["verdict"] == "mergeable" and report["actions"] == []
    assert (out / "mergeability" / "report.md").is_file()
    assert (out / "mergeability" / "hidden_sim.png").is_file()


def test_guard_over_budget_exits_3_and_leaves_no_output(configs, tmp_path):
    out, reports = tmp_path / "merged", tmp_path / "reports"
    res = run(MERGEKIT_YAML, str(configs["bad"]), str(out), "--guard", "--guard-absolute-budget",
              BUDGET, "--guard-report", str(reports), "--quiet")
    assert res.returncode == 3, res.stderr
    assert not out.exists()
    lines = [x for x in res.stderr.splitlines() if x.startswith("mergekit-collapse:")]
    assert len(lines) == 1 and "guard stopped the merge" in lines[0] and "ft3" in lines[0]
    assert "Traceback" not in res.stderr
    report = json.loads((reports / "report.json").read_text())
    assert report["verdict"] == "collapse" and report["actions"][0]["action"] == "abort"


def test_without_guard_output_equals_plain_mergekit(configs, tmp_path):
    hooked, plain = tmp_path / "a" / "merged", tmp_path / "b" / "merged"  # same name: same card
    res = run(MERGEKIT_YAML, str(configs["bad"]), str(hooked), "--quiet")
    assert res.returncode == 0, res.stderr
    res = run(MERGEKIT_YAML, str(configs["bad"]), str(plain), "--quiet",
              env={"MERGEKIT_COLLAPSE_DISABLE": "1"})
    assert res.returncode == 0, res.stderr
    a, b = digests(hooked), digests(plain)
    assert "model.safetensors" in b and set(a) == set(b)
    # mergekit's own card lists referenced_models(), a set of ModelReferences whose hash involves
    # hash(None) (address-based in Python 3.11): its line order differs between any two runs
    card = "README.md"
    assert {k: v for k, v in a.items() if k != card} == {k: v for k, v in b.items() if k != card}
    lines = [sorted((d / card).read_text().splitlines()) for d in (hooked, plain)]
    assert lines[0] == lines[1]
    assert not (hooked / "mergeability").exists()


def test_help_lists_guard_options_unless_disabled():
    res = run(MERGEKIT_YAML, "--help")
    assert (res.returncode == 0 and "--guard-action" in res.stdout
            and "--guard-merge-all" in res.stdout)
    res = run(MERGEKIT_YAML, "--help", env={"MERGEKIT_COLLAPSE_DISABLE": "1"})
    assert res.returncode == 0 and "--guard" not in res.stdout and "--out-shard-size" in res.stdout


def test_broken_hook_leaves_plain_mergekit_working(configs, tmp_path):
    # a mergekit_collapse that raises on import shadows the installed one (PYTHONPATH comes first)
    broken = tmp_path / "broken" / "mergekit_collapse"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("")
    (broken / "cli").mkdir()
    (broken / "cli" / "__init__.py").write_text("")
    (broken / "cli" / "mergekit_yaml.py").write_text(
        "raise RuntimeError('deliberately broken hook')\n")
    env = {"PYTHONPATH": str(broken.parent)}
    res = run(MERGEKIT_YAML, "--help", env=env)
    assert res.returncode == 0 and "--guard" not in res.stdout and "Traceback" not in res.stderr
    out = tmp_path / "merged"
    res = run(MERGEKIT_YAML, str(configs["ok"]), str(out), "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    assert (out / "model.safetensors").is_file()


def test_hook_loader_swallows_install_errors(monkeypatch):
    import types

    import _mergekit_collapse_hook as hook
    import mergekit_collapse.cli.mergekit_yaml as mergekit_yaml

    def boom(module):
        raise RuntimeError("deliberately broken")

    class Inner:
        def exec_module(self, module):
            module.ran = True

    monkeypatch.setattr(mergekit_yaml, "install_guard", boom)
    module = types.ModuleType("fake")
    hook._GuardLoader(Inner()).exec_module(module)  # no exception escapes
    assert module.ran


def test_install_guard_is_idempotent_and_checks_its_target():
    import types

    import click

    from mergekit_collapse.cli.mergekit_yaml import GUARD_PARAM_NAMES, install_guard

    @click.command()
    @click.argument("config_file")
    @click.argument("out_path")
    def main(config_file, out_path):
        return ("plain", config_file, out_path)

    module = types.SimpleNamespace(main=main)
    install_guard(module)
    install_guard(module)
    names = [p.name for p in main.params]
    assert [n for n in names if n in GUARD_PARAM_NAMES] == list(GUARD_PARAM_NAMES)
    assert main.callback(config_file="c", out_path="o", **dict.fromkeys(GUARD_PARAM_NAMES)) == (
        "plain", "c", "o")
    with pytest.raises(TypeError):
        install_guard(types.SimpleNamespace(main=lambda: None))


def test_merge_command_drop_end_to_end(configs, tmp_path):
    out = tmp_path / "merged"
    res = run(COLLAPSE, "merge", str(configs["bad"]), str(out), "--guard-action", "drop",
              "--guard-absolute-budget", BUDGET, "--guard-weights", "apply", "--quiet")
    assert res.returncode == 0, res.stderr
    pruned = yaml.safe_load((tmp_path / "merged.drop-weights.yml").read_text())
    kept = [Path(m["model"]).name for m in pruned["models"]]
    assert kept == ["ft1", "ft2"]
    assert [Path(k).name for k in pruned["guard"]["tasks"]] == ["ft1", "ft2"]
    assert pruned["base_model"].endswith("base") and pruned["dtype"] == "float32"
    assert sum(m["parameters"]["weight"] for m in pruned["models"]) == pytest.approx(1.0)
    assert (out / "model.safetensors").is_file()
    merged_cfg = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert [Path(m["model"]).name for m in merged_cfg["models"]] == ["ft1", "ft2"]
    report = json.loads((out / "mergeability" / "report.json").read_text())
    drop = [a for a in report["actions"] if a["action"] == "drop"]
    assert len(drop) == 1 and Path(drop[0]["models"][0]).name == "ft3"
    assert "MDS" in drop[0]["reason"] and drop[0]["configs"]


def test_merge_command_passes_mergekit_options_through(configs, tmp_path):
    res = run(COLLAPSE, "merge", "--help")
    assert res.returncode == 0
    for flag in ("--out-shard-size", "--lazy-unpickle", "--copy-tokenizer", "--guard-action"):
        assert flag in res.stdout
    out = tmp_path / "merged"
    res = run(COLLAPSE, "merge", str(configs["bad"]), str(out), "--guard-absolute-budget", BUDGET,
              "--quiet")
    assert res.returncode == 3 and not out.exists()
    assert res.stderr.strip().startswith("error: guard stopped the merge")


def test_order_runs_a_multi_stage_plan_end_to_end(tiny_zoo, tmp_path):
    raw = config(tiny_zoo, ["ft1", "ft2", "ft3"], action="order")
    raw.update(merge_method="slerp", parameters={"t": 0.5})
    del raw["base_model"]
    for m in raw["models"]:
        del m["parameters"]
    path = tmp_path / "order.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "merged"
    res = run(MERGEKIT_YAML, str(path), str(out), "--guard-absolute-budget", BUDGET, "--quiet")
    assert res.returncode == 0, res.stderr
    docs = list(yaml.safe_load_all((tmp_path / "merged.order.yml").read_text()))
    assert [Path(m["model"]).name for m in docs[0]["models"]] == ["ft1", "ft2"]  # closest first
    assert docs[1]["base_model"] == "stage-1" and "name" not in docs[1]
    assert (tmp_path / "merged.stages" / "stage-1" / "model.safetensors").is_file()
    assert (out / "model.safetensors").is_file()
    report = json.loads((out / "mergeability" / "report.json").read_text())
    assert [a["action"] for a in report["actions"]] == ["order", "order"]
