"""The base anchor for every config shape, the rehearsal (in-memory merge vs each constituent's own
answers) and the one decision table, on tiny real models."""

from __future__ import annotations

import shutil

import yaml
from common import QUIET32

from mergekit_collapse.guard.assess import check, extraction_settings
from mergekit_collapse.guard.config import parse_config
from mergekit_collapse.guard.decision import decide
from mergekit_collapse.guard.probes import build_probes
from mergekit_collapse.guard.rehearsal import rehearse
from mergekit_collapse.runtime import Runtime

PROBES = ["the cat sat on", "one two three", "hello there", "a b c d", "zero one", "red green"]


def ref(zoo, m):
    return str(zoo[m]) if "lora" not in m else f"{zoo['base']}+{zoo[m]}"


def config(zoo, models, method="linear", base_model=True, **guard):
    refs = [ref(zoo, m) for m in models]
    raw = {"merge_method": method, "dtype": "float32",
           "models": [{"model": r, "parameters": {"weight": 1.0}} for r in refs],
           "guard": {"k": 2, "tasks": {r: {"name": m, "probes": PROBES[2 * i: 2 * i + 2]}
                                       for i, (r, m) in enumerate(zip(refs, models, strict=True))},
                     **guard}}
    if base_model:
        raw["base_model"] = str(zoo["base"])
    return raw


def parsed(raw):
    return parse_config(yaml.safe_dump(raw))


# ---------------------------------------------------------------- the base anchor


def test_linear_of_loras_infers_the_shared_base(tiny_zoo):
    cfg = parsed(config(tiny_zoo, ["lora1", "lora2"], base_model=False))
    assert str(cfg.base) == str(tiny_zoo["base"]) and "base+lora" in cfg.base_source
    report = check(cfg, runtime=QUIET32, rehearse="off")
    assert all(m.relative_distortion is not None and m.risk_band is not None for m in report.models)


def test_guard_base_anchors_full_finetunes(tiny_zoo):
    raw = config(tiny_zoo, ["ft1", "ft2"], base_model=False, base=str(tiny_zoo["base"]))
    cfg = parsed(raw)
    assert cfg.base_source == "guard.base" and str(cfg.base) == str(tiny_zoo["base"])
    assert check(cfg, runtime=QUIET32, rehearse="off").models[0].risk_score is not None


def test_no_base_is_said_and_is_not_mergeable(tiny_zoo):
    cfg = parsed(config(tiny_zoo, ["ft1", "ft2"], base_model=False))
    assert cfg.base is None and "guard.base" in cfg.base_source
    report = check(cfg, runtime=QUIET32, rehearse="off")
    assert all(m.risk_score is None for m in report.models)
    assert report.verdict in ("unassessed", "collapse")
    assert any(n.startswith("risk score unavailable") for n in report.notes)
    # the geometric test, asked for explicitly, still gives a bounds verdict
    explicit = check(cfg, runtime=QUIET32, rehearse="off", absolute_budget=1e9)
    assert (explicit.verdict, explicit.decided_by) == ("mergeable", "jung")


def test_slerp_with_its_base_among_the_sources_is_a_merge_of_both(tiny_zoo):
    a, b = str(tiny_zoo["ft1"]), str(tiny_zoo["ft2"])
    raw = {"merge_method": "slerp", "base_model": a, "dtype": "float32", "parameters": {"t": 0.5},
           "slices": [{"sources": [{"model": a, "layer_range": [0, 2]},
                                   {"model": b, "layer_range": [0, 2]}]}],
           "guard": {"k": 2, "base": str(tiny_zoo["base"]),
                     "tasks": {a: {"name": "A", "probes": PROBES[:2]},
                               b: {"name": "B", "probes": PROBES[2:4]}}}}
    report = check(parsed(raw), runtime=QUIET32)
    assert [m.task for m in report.models] == ["A", "B"]
    assert all(m.risk_score is not None and m.predicted_retention is not None
               for m in report.models)
    assert report.rehearsal.status == "ran"


# ---------------------------------------------------------------- the rehearsal


def _rehearse(zoo, models, method="linear", base_model=True):
    cfg = parsed(config(zoo, models, method=method, base_model=base_model))
    probes = build_probes(cfg)
    by = {str(m): [t for t, task in zip(probes.texts, probes.tasks, strict=True)
                   if task == cfg.task_of(m).name] for m in cfg.models}
    settings = extraction_settings(cfg, Runtime(dtype="float32"))
    return cfg, rehearse(cfg.merge, cfg.models, by, settings, answer_tokens=8)


def test_a_merge_of_one_model_reproduces_it_exactly(tiny_zoo):
    cfg, r = _rehearse(tiny_zoo, ["ft1"], base_model=False)
    s = r.models[str(cfg.models[0])]
    assert s["rehearsal_agreement"] == 1.0 and s["rehearsal_token_agreement"] == 1.0
    assert abs(s["rehearsal_kl"]) < 1e-6
    assert set(r.seconds) == {"answers", "merge", "compare"}


def test_the_outlier_is_the_one_the_merge_departs_from(tiny_zoo):
    # ft3 is perturbed 8x more than ft1 and ft2: their average is far from it
    cfg, r = _rehearse(tiny_zoo, ["ft1", "ft2", "ft3"], base_model=False)
    kl = {m.split("/")[-1]: v["rehearsal_kl"] for m, v in r.models.items()}
    assert kl["ft3"] > 3 * max(kl["ft1"], kl["ft2"]), r.seconds


def test_lora_merge_cache_follows_adapter_content(tiny_zoo, tmp_path):
    import shutil

    from common import make_lora

    zoo = dict(tiny_zoo)
    zoo["lora9"] = shutil.copytree(tiny_zoo["lora1"], tmp_path / "lora9")
    cfg, first = _rehearse(zoo, ["lora9", "lora2"], base_model=False)
    make_lora(zoo["base"], zoo["lora9"], seed=99)  # new content, same folder
    _, second = _rehearse(zoo, ["lora9", "lora2"], base_model=False)
    key = str(cfg.models[0])
    assert first.models[key] != second.models[key]


def test_auto_skips_a_merge_above_the_size_gate_and_says_so(tiny_zoo):
    cfg = parsed(config(tiny_zoo, ["ft1", "ft2"], base_model=False, rehearse_max_gb=1e-9))
    report = check(cfg, runtime=QUIET32)
    assert report.rehearsal.status == "skipped" and "rehearse_max_gb" in report.rehearsal.reason
    assert all(m.predicted_retention is None for m in report.models)


# ---------------------------------------------------------------- the decision table


def test_decision_table():
    within, over = ("mergeable", "exact"), ("collapse", "converse")
    ok, bad, none = ["low", "elevated"], ["low", "collapse"], [None, None]
    # an explicit budget: the bounds alone
    assert decide(bounds=within, budget_source="config", signals={"risk": bad},
                  prefer="risk")[:2] == within
    # the calibrated default: the preferred complete signal decides
    assert decide(bounds=within, budget_source="calibration",
                  signals={"risk": ok, "rehearsal": bad},
                  prefer="rehearsal")[:2] == ("collapse", "rehearsal")
    assert decide(bounds=within, budget_source="calibration",
                  signals={"risk": bad, "rehearsal": ok},
                  prefer="rehearsal")[:2] == ("mergeable", "rehearsal")
    # an incomplete preferred signal falls back to the other
    assert decide(bounds=within, budget_source="calibration",
                  signals={"risk": ok, "rehearsal": none},
                  prefer="rehearsal")[:2] == ("mergeable", "risk")
    # beside a validated signal the bounds at the calibrated budget are no veto ...
    assert decide(bounds=over, budget_source="calibration", signals={"risk": ok},
                  prefer="risk")[:2] == ("mergeable", "risk")
    # ... but without one they still stop the merge
    assert decide(bounds=over, budget_source="calibration", signals={"risk": none},
                  prefer="risk")[:2] == over
    # no signal: never a bare "mergeable"
    v, by, why = decide(bounds=within, budget_source="calibration", signals={"risk": none},
                        prefer="risk")
    assert (v, by) == ("unassessed", "none") and "no validated" in why


def test_a_corrupt_answer_cache_entry_is_recomputed(tiny_zoo, _isolated_cache):
    cfg, first = _rehearse(tiny_zoo, ["ft1", "ft2"], base_model=False)
    entries = sorted((_isolated_cache / "answers").rglob("*.npz"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated, as by a crash
    shutil.rmtree(_isolated_cache / "rehearsals")  # the result itself is cached too
    _, second = _rehearse(tiny_zoo, ["ft1", "ft2"], base_model=False)
    assert second.models == first.models


def test_a_rehearsal_is_cached_by_what_it_depends_on(tiny_zoo, _isolated_cache, caplog):
    _, first = _rehearse(tiny_zoo, ["ft1", "ft2"], base_model=False)
    _, again = _rehearse(tiny_zoo, ["ft1", "ft2"], base_model=False)
    assert again.models == first.models and set(again.seconds) == {"cached"}
    (entry,) = (_isolated_cache / "rehearsals").rglob("*.json")
    entry.write_text("{not json")
    _, third = _rehearse(tiny_zoo, ["ft1", "ft2"], base_model=False)
    assert third.models == first.models and "merge" in third.seconds
    assert "malformed rehearsal cache entry" in caplog.text
    _, other = _rehearse(tiny_zoo, ["ft1", "ft3"], base_model=False)  # another merge: not a hit
    assert "merge" in other.seconds


def test_cli_switches_the_rehearsal_and_names_the_base(tiny_zoo, tmp_path):
    import json
    import subprocess
    import sys

    raw = config(tiny_zoo, ["ft1", "ft2"], base_model=False)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "mergekit_collapse", "check", str(path),
                          "--format", "json", "--rehearse", "off", "--base", str(tiny_zoo["base"]),
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    report = json.loads(res.stdout)
    assert report["rehearsal"]["status"] == "off"
    assert report["base_model"] == str(tiny_zoo["base"])
    assert res.returncode == (0 if report["verdict"] == "mergeable" else 3)


def test_unquoted_on_off_in_yaml_mean_on_and_off():
    text = ("merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: a/x\n"
            "  - model: a/y\nguard:\n  rehearse: {}\n")
    assert [parse_config(text.format(v)).guard.rehearse for v in ("off", "on", "auto")] == \
        ["off", "on", "auto"]


def test_the_rehearsal_leaves_the_config_as_written(tiny_zoo):
    # mergekit's planner rewrites `models:` into `modules:` in place;
    # the guard's config must not change
    cfg, _ = _rehearse(tiny_zoo, ["ft1", "ft2"], base_model=False)
    assert cfg.merge.models is not None and cfg.merge.modules is None


def test_one_load_per_model_for_hidden_states_and_answers(tiny_zoo, monkeypatch):
    """The rehearsal's answers come from the load that computed the hidden states: each model
    (each base, for LoRAs) is loaded once; a warm re-run loads none but the merge's layers."""
    import mergekit_collapse.guard.extract as extract_mod
    import mergekit_collapse.guard.rehearsal as rehearsal_mod

    loads = []
    for mod in (extract_mod, rehearsal_mod):
        real = mod.load_causal_lm
        monkeypatch.setattr(mod, "load_causal_lm", lambda *a, _real=real, **k: loads.append(a[0])
                            or _real(*a, **k))
    cfg = parsed(config(tiny_zoo, ["ft1", "ft2", "lora1"], method="task_arithmetic"))
    report = check(cfg, runtime=QUIET32, rehearse="on")
    assert report.rehearsal.status == "ran"
    assert sorted(map(str, loads)) == sorted(str(tiny_zoo[m]) for m in ("base", "ft1", "ft2"))
    loads.clear()
    again = check(cfg, runtime=QUIET32, rehearse="on")
    assert loads == [] and [m.rehearsal_agreement for m in again.models] == \
        [m.rehearsal_agreement for m in report.models]


def test_a_guard_base_other_than_base_model_is_noted_in_the_report(tiny_zoo):
    raw = config(tiny_zoo, ["ft1", "ft2"], method="task_arithmetic", base=str(tiny_zoo["ft3"]))
    report = check(parsed(raw), runtime=QUIET32, rehearse="off")
    assert any("not the config's base_model" in n and "ft3" in n for n in report.notes)


def test_partial_credit_orders_by_agreement_then_tokens():
    from mergekit_collapse.guard.rehearsal import ProbeComparison, partial_credit

    assert partial_credit(0.6, 1.0, 5) < partial_credit(0.8, 0.0, 5)  # less than one step
    assert partial_credit(0.6, 0.2, 5) < partial_credit(0.6, 0.9, 5)
    assert partial_credit(1.0, 1.0, 10) == 1.05 and partial_credit(0.0, 0.0, 5) == 0.0
    s = ProbeComparison([True, False], [1.0, 0.5], [0.0, 0.1]).summary()
    assert s["rehearsal_partial"] == 0.5 + 0.75 / 4
