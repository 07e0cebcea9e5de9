"""Hidden states on several processes (`check --num-processes 2`, accelerate on gloo): the same
report as one process, one reporter, errors of any process reported once; the cache loses no
update."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner
from mergekit.common import ModelReference

from mergekit_collapse.cli import main
from mergekit_collapse.guard.cache import VectorCache
from mergekit_collapse.guard.distributed import shares
from mergekit_collapse.guard.forward import ExtractionSettings

PROBES = ["alpha beta", "gamma delta epsilon", "zeta eta", "one two three", "four five", "x y z",
          "merge the models", "what is the capital"]


def write_config(path: Path, base: Path, refs: list[str]) -> Path:
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
           "models": [{"model": r, "parameters": {"weight": 0.5}} for r in refs],
           "guard": {"k": 2, "tasks": {r: {"name": f"t{i}", "probes": PROBES[2 * i: 2 * i + 2]}
                                       for i, r in enumerate(refs)}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def without_timing(report: dict) -> dict:
    """The report less its one run-dependent field, run_info (report.md: its last words)."""
    report.pop("run_info")
    return report


def test_shares_keep_a_base_and_its_adapters_together_unless_processes_idle(tiny_zoo):
    z = {k: str(v) for k, v in tiny_zoo.items()}
    refs = [ModelReference.parse(r) for r in
            (z["ft1"], f"{z['base']}+{z['lora1']}", z["ft2"], f"{z['base']}+{z['lora2']}",
             z["base"])]
    two = shares(refs, 2)
    assert sorted(str(r) for s in two for r in s) == sorted(map(str, refs))
    with_base = [s for s in two if any(z["base"] == str(r.model) for r in s)]
    assert len(with_base) == 1 and len(with_base[0]) == 3  # the base once, its two adapters with it
    assert [str(r) for r in two[1]] == [z["ft1"], z["ft2"]]  # the lighter share; the config's order
    # five processes, five models: the base's group is split (each part loads the base once)
    assert [len(s) for s in shares(refs, 5)] == [1, 1, 1, 1, 1]
    adapters = [ModelReference.parse(f"{z['base']}+{z[k]}") for k in ("lora1", "lora2")] * 4
    assert [len(s) for s in shares(adapters, 4)] == [2, 2, 2, 2]


def test_two_processes_give_the_same_report(tiny_zoo, tmp_path, monkeypatch):
    z = tiny_zoo
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "good.yml", z["base"], [
        str(z["ft1"]), str(z["ft3"]), f"{z['base']}+{z['lora1']}", f"{z['base']}+{z['lora2']}"])
    broken = tmp_path / "no-weights"  # a config and a tokenizer, no weights
    broken.mkdir()
    for f in z["base"].glob("*.json"):
        (broken / f.name).write_bytes(f.read_bytes())
    # base, ft1 and ft3 cost alike, the weightless folder least: process 1 gets ft1 and it
    refs = [str(z["ft1"]), str(z["ft3"]), str(broken)]
    per_process = shares([ModelReference.parse(r) for r in [str(z["base"]), *refs]], 2)
    assert str(broken) in map(str, per_process[1])
    write_config(tmp_path / "broken.yml", z["base"], refs)
    flags = ["--absolute-budget", "1e9", "--format", "json"]
    one = CliRunner().invoke(main, ["check", "good.yml", "--out", "one", "--no-progress", *flags])
    assert one.exit_code == 0, one.output

    # the broken config first: after its error the processes still meet on the next config
    two = subprocess.run([sys.executable, "-m", "mergekit_collapse", "check", "broken.yml",
                          "good.yml", "--num-processes", "2", "--out", "two", "--cache-dir", "c2",
                          *flags],
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 2, two.stderr  # the most severe status: bad input
    # the error of process 1, reported once, by the main process
    assert two.stderr.count("error:") == 1
    assert f"error: '{broken}' has no weight files in {broken}" in two.stderr
    summary = json.loads(two.stdout)  # one summary: only the main process prints
    assert [c["exit_code"] for c in summary["configs"]] == [2, 0]
    # for good.yml the main process extracted its share: the base and its adapters (3 of 5 models)
    assert max(int(n) for n in re.findall(r"hidden states \d+/(\d+)", two.stderr)) == 3
    report = json.loads((tmp_path / "two" / "good" / "report.json").read_text())
    assert report == summary["configs"][1]["report"] and report["rehearsal"]["status"] == "ran"
    assert without_timing(report) == without_timing(json.loads((tmp_path / "one" / "report.json")
                                                                .read_text()))
    md = [re.sub(r"; (answers|cached) [^\n]*", "", (tmp_path / d / "report.md").read_text())
          for d in ("one", "two/good")]
    assert md[0] == md[1]
    assert (tmp_path / "one" / "hidden_sim.png").read_bytes() == \
        (tmp_path / "two" / "good" / "hidden_sim.png").read_bytes()


def test_concurrent_cache_writers_lose_no_update(tmp_path):
    """Two writers of one cache file, each holding what it read before the other wrote (two
    threads: the lock is a file lock, per open file, so it works between threads as between
    processes)."""
    ready = threading.Barrier(2)

    def write_half(start: int) -> None:
        cache = VectorCache("same-model", ExtractionSettings(), "float32", tmp_path)
        ready.wait()  # both have read the (empty) file before either writes
        for i in range(start, start + 20):
            cache.update({f"k{i}": np.full(4, i, dtype=np.float32)})

    writers = [threading.Thread(target=write_half, args=(s,)) for s in (0, 20)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    data = VectorCache("same-model", ExtractionSettings(), "float32", tmp_path).data
    assert sorted(data) == sorted(f"k{i}" for i in range(40))
    assert all(v[0] == int(k[1:]) for k, v in data.items())


def test_several_configs_spread_their_rehearsals_over_the_processes(tiny_zoo, tmp_path,
                                                                    monkeypatch):
    """Before the checks, process r rehearses configs r, r + 2, ... into the cache: the checks read
    every rehearsal from it (its cost shows as `cached`), and each matches a one-process run."""
    z = tiny_zoo
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path / "a.yml", z["base"], [str(z["ft1"]), str(z["ft2"])])
    write_config(tmp_path / "b.yml", z["base"], [str(z["ft1"]), f"{z['base']}+{z['lora1']}"])
    flags = ["a.yml", "b.yml", "--absolute-budget", "1e9", "--format", "json", "--no-progress"]
    one = CliRunner().invoke(main, ["check", *flags, "--out", "one"])
    assert one.exit_code == 0, one.output
    two = subprocess.run([sys.executable, "-m", "mergekit_collapse", "check", *flags, "--out",
                          "two", "--num-processes", "2", "--cache-dir", "c2"],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    steps = {}
    for name in ("a", "b"):
        ran = [json.loads((tmp_path / d / name / "report.json").read_text())
               for d in ("one", "two")]
        assert [[m["rehearsal_agreement"] for m in r["models"]] for r in ran] == \
            [[m["rehearsal_agreement"] for m in ran[0]["models"]]] * 2
        steps[name] = set(ran[1]["run_info"]["seconds"])
    assert "rehearsal.cached" in steps["a"] and "rehearsal.cached" in steps["b"]
