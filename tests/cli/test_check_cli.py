"""`mergekit-collapse check` end to end on tiny real models: report keys, exit codes, heatmap."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

import pytest
from common import QUIET, tiny_config

from mergekit_collapse import check


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mergekit_collapse", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_report_keys_and_outputs(tiny_zoo, tmp_path):
    # mean pooling: on these random models the random LoRA moves the last token more than ft3
    cfg = tiny_config(tmp_path, tiny_zoo, models=("ft1", "ft2", "lora1", "ft3"), pooling="mean")
    out = tmp_path / "out"
    res = run_cli("check", cfg, "--format", "json", "--out", out, "--absolute-budget", "1e9")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    for key in ("schema_version", "models", "hidden_sim", "distances", "bounds", "weights",
                "budget", "verdict", "decided_by", "probes", "layer", "pooling"):
        assert key in report
    assert set(report["models"][0]) >= {"name", "task", "mds", "mean_hidden_sim",
                                        "distortion_optimal", "distortion_uniform"}
    assert set(report["bounds"]) >= {"diameter", "converse", "jung", "jung_n", "exact"}
    assert set(report["distances"]) == {"mean", "rms"}
    assert set(report["budget"]) >= {"mode", "value", "absolute"}
    assert report["probes"]["count"] == 8 and len(report["probes"]["sha256"]) == 64
    assert report["verdict"] == "mergeable" and report["decided_by"] == "jung"
    assert (out / "hidden_sim.png").stat().st_size > 1000
    assert (out / "report.md").read_text().startswith("### ✅")
    assert json.loads((out / "report.json").read_text())["verdict"] == "mergeable"
    # ft3 is perturbed 8x more than ft1/ft2: the guard names it as the outlier
    mds = {m["task"]: m["mds"] for m in report["models"]}
    assert max(mds, key=mds.get) == "ft3"


def test_exit_3_when_over_budget(tiny_zoo, tmp_path):
    res = run_cli("check", tiny_config(tmp_path, tiny_zoo), "--absolute-budget", "1e-6")
    assert res.returncode == 3, res.stderr
    assert "COLLAPSE" in res.stdout and "converse" in res.stdout


def test_exact_decides_between_the_bounds(tiny_zoo, tmp_path):
    cfg = tiny_config(tmp_path, tiny_zoo)
    r = check(cfg, runtime=QUIET, absolute_budget=1.0)
    b = r.bounds
    for budget, verdict in (((b.converse + b.exact) / 2, "collapse"),
                            ((b.exact + b.jung) / 2, "mergeable")):
        r = check(cfg, runtime=QUIET, absolute_budget=budget)  # cached: no model is reloaded
        assert (r.verdict, r.decided_by) == (verdict, "exact")


def test_relative_budget_uses_base_spread(tiny_zoo, tmp_path):
    r = check(tiny_config(tmp_path, tiny_zoo), runtime=QUIET, budget=0.5)
    assert r.budget.mode == "relative" and r.budget.scale > 0
    assert r.budget.absolute == pytest.approx(0.5 * r.budget.scale)
    assert all(m.retention is not None for m in r.models)


@pytest.mark.parametrize("content, message", [
    ("models: [", "malformed YAML"),
    ("merge_method: linear\nmodels: [{model: /nonexistent/x, parameters: {weight: 1}},\n"
     "  {model: /nonexistent/y, parameters: {weight: 1}}]\n"
     "guard: {k: 1, tasks: {/nonexistent/x: {name: t, probes: [hi]}, "
     "/nonexistent/y: {name: u, probes: [yo]}}}",
     "not a local folder"),
    ("merge_method: linear\nmodels: [{model: a/b}]\nguard: {taks: {}}", "did you mean 'tasks'"),
])
def test_bad_input_exit_2_one_line(tmp_path, content, message):
    path = tmp_path / "bad.yml"
    path.write_text(content)
    res = run_cli("check", path)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_help_is_fast_and_lists_commands():
    from mergekit_collapse.cli import COMMANDS

    res = run_cli("--help")
    assert res.returncode == 0
    assert all(name in res.stdout for name in COMMANDS)
    # listing every command's help imports none of them (several import torch)
    code = ("import sys; from click.testing import CliRunner; from mergekit_collapse.cli import "
            "main; r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules and 'mergekit' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_every_listed_command_resolves():
    import click

    from mergekit_collapse.cli import COMMANDS, main

    for name in COMMANDS:
        command = main.get_command(None, name)
        assert isinstance(command, click.Command) and command.name == name


def _without_run_info(data: dict) -> dict:
    """A report (or summary.json) less its one run-dependent field, `run_info`."""
    for report in [data, *(c["report"] for c in data.get("configs", []) if c.get("report"))]:
        report.pop("run_info", None)
    return data


def test_same_inputs_and_seed_give_a_byte_identical_report(tiny_zoo, tmp_path):
    """Two cold runs (separate caches, so everything is recomputed): report.json is byte-identical
    but for `run_info`, which holds every timing and the date."""
    import os

    cfg = tiny_config(tmp_path, tiny_zoo, seed=7)  # rehearse: auto runs on these tiny models
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        res = subprocess.run(
            [sys.executable, "-m", "mergekit_collapse", "check", str(cfg), "--out", str(out),
             "--no-progress"], capture_output=True, text=True, timeout=300,
            env={**os.environ, "MERGEKIT_COLLAPSE_CACHE": str(tmp_path / f"cache{run}")})
        assert res.returncode in (0, 3), res.stderr
        outs.append(out)
    texts = [(o / "report.json").read_text() for o in outs]
    reports = [json.loads(t) for t in texts]
    assert reports[0]["schema_version"] == "1.1" and reports[0]["rehearsal"]["status"] == "ran"
    run_info = reports[0]["run_info"]
    assert set(run_info) == {"date", "seconds"}
    assert set(run_info["seconds"]) == {"extract", "rehearsal.answers", "rehearsal.merge",
                                        "rehearsal.compare", "assess", "total"}
    assert all(isinstance(v, float) and v >= 0 for v in run_info["seconds"].values())
    assert datetime.fromisoformat(run_info["date"]).tzinfo is not None
    # run_info is the last field: cut it off the text as written and compare the bytes
    cut = [t[:t.index(',\n  "run_info": {')] for t in texts]
    assert cut[0] == cut[1]
    assert json.loads(cut[0] + "\n}") == _without_run_info(reports[0])

    def keys(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from keys(v)
        elif isinstance(x, list):
            for v in x:
                yield from keys(v)

    # nothing time-like outside run_info (the calibration's provenance is a fixed input file's)
    rest = _without_run_info(reports[0])
    rest["risk"].pop("calibration")
    assert not [k for k in keys(rest) if any(w in k.lower() for w in ("second", "date", "time"))]
    for name in ("summary.json", "results.sarif"):
        a, b = (json.loads((o / name).read_text()) for o in outs)
        assert _without_run_info(a) == _without_run_info(b), name
