"""The mergeability card: rendering, metadata round trip through `ModelCard.load`, custom templates,
CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from common import QUIET
from reports import MODELS, make_merged_dir, make_report

from mergekit_collapse.cli import main
from mergekit_collapse.errors import EXIT_BAD_INPUT, BadInputError
from mergekit_collapse.guard.report import (
    GuardReport,
)
from mergekit_collapse.publish.card import (
    default_template_path,
    load_card_metadata,
    render_card,
    write_card,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture
def merged_dir(tmp_path: Path) -> Path:
    return make_merged_dir(tmp_path)


def test_card_metadata_round_trips_through_model_card_load(merged_dir: Path) -> None:
    from huggingface_hub import ModelCard

    path = write_card(merged_dir)
    assert path == merged_dir / "README.md"
    data = ModelCard.load(path).data
    # local paths are not Hub ids: only the two acme/ constituents are lineage
    assert data.base_model == [MODELS[0], MODELS[1]]
    assert data.base_model_relation == "merge"
    assert data.tags == ["merge", "mergekit", "mergekit-collapse"]
    assert data.library_name == "transformers"
    assert data.model_name == "merged"
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("sst2", "acc"): 0.6, ("gsm8k", "exact_match"): 0.29}

    m = data.mergeability
    assert m["verdict"] == "mergeable" and m["decided_by"] == "exact"
    assert m["budget"] == {"mode": "relative", "value": 0.5, "absolute": 1.1, "scale": 2.2,
                           "scale_source": "base spread"}
    assert m["bounds"]["converse"] == 1.0 and m["bounds"]["jung"] == pytest.approx(4 / 3)
    assert m["bounds"]["jung_n"] == 2 and m["bounds"]["exact"] == 1.0
    # models go by display name: a Hub id stays, a local path is never published
    assert [(x["name"], x["task"]) for x in m["models"]] == [
        (MODELS[0], "sentiment"), (MODELS[1], "math"), ("llama-code", "code")]
    assert [x["mds"] for x in m["models"]][:2] == [1.25, 1.5]
    # report.json itself writes inf as null (pydantic's JSON default),
    # so the card shows what it read
    assert m["models"][2]["mds"] == GuardReport.read(merged_dir / "mergeability").models[2].mds
    assert [x["distortion"] for x in m["models"]] == [0.5, 0.75, 1.0]
    assert m["probes"]["sha256"] == "ab" * 32
    assert m["layer"] == -1 and m["pooling"] == "last"
    assert m["actions"] == [{"action": "warn", "changed": "nothing",
                             "reason": "code is the outlier"}]
    assert m["tool_version"] == "0.1.0"
    assert m["observed"]["mean_loss"] == -20.1 and m["observed"]["dtype"] == "float32"
    assert "lm-eval (float32) on 50 documents per task" in ModelCard.load(path).text
    assert m["observed"]["tasks"][0]["loss"] == -36.8
    assert m["observed"]["tasks"][0]["observed_retention"] == 0.4
    assert "observed_retention" not in m["observed"]["tasks"][1]


def test_infinite_mds_survives_the_yaml_metadata() -> None:
    from huggingface_hub import ModelCard

    from mergekit_collapse.publish.card import card_data

    data = card_data(make_report(), None, model_name="m")
    back = ModelCard(f"---\n{data.to_yaml()}\n---\n# m\n").data.mergeability
    assert math.isinf(back["models"][2]["mds"])
    assert back == data["mergeability"]


def test_risk_score_is_carried_when_the_report_has_one() -> None:
    from mergekit_collapse.guard.report import RiskInfo
    from mergekit_collapse.publish.card import mergeability_metadata

    report = make_report()
    report.risk = RiskInfo(score="relative_distortion", direction="higher", elevated=0.5,
                           collapse=1.0, calibration={"n": 12}, auroc=0.8)
    report.models[0].risk_score, report.models[0].risk_band = 0.7, "elevated"
    block = mergeability_metadata(report)
    assert block["risk"] == {"score": "relative_distortion", "direction": "higher", "elevated": 0.5,
                             "collapse": 1.0, "calibration": {"n": 12}, "auroc": 0.8}
    assert block["models"][0]["risk_band"] == "elevated" and block["models"][0]["risk_score"] == 0.7
    assert block["models"][1]["risk_band"] is None
    assert "risk" not in mergeability_metadata(make_report())


def test_card_names_the_calibration_and_its_bases(tmp_path: Path) -> None:
    from mergekit_collapse.guard.calibration import load_calibration
    from mergekit_collapse.guard.report import RiskInfo

    cal = load_calibration()
    report = make_report()
    report.risk = RiskInfo(score=cal.score, direction=cal.direction, elevated=cal.bands.elevated,
                           collapse=cal.bands.collapse, calibration=cal.source)
    text = render_card(make_merged_dir(tmp_path, report=report)).text
    line = next(x for x in text.splitlines() if x.startswith("Calibration: "))
    assert f"`{cal.source['name']}`" in line and f"{cal.source['merges']} merges" in line
    assert all(base in line for base in cal.source["bases"])
    assert "Calibration: " not in render_card(make_merged_dir(tmp_path / "b")).text  # none: no line


def test_card_body_has_heatmap_table_prediction_and_config(merged_dir: Path) -> None:
    text = write_card(merged_dir).read_text()
    body = text.split("\n---\n", 1)[1]
    assert "![HiddenSim heatmap](mergeability/hidden_sim.png)" in body
    assert (merged_dir / "mergeability" / "hidden_sim.png").is_file()
    assert "| `acme/llama-sentiment` | sentiment | 1.25 |" in body
    assert "| `llama-code` | code | — |" in body  # inf read back from JSON as null
    assert "/local/ckpt" not in text
    assert "## Predicted vs observed" in body
    assert "| sst2 |" in body and "-36.8" in body
    assert "![Predicted vs observed](mergeability/predicted_vs_observed.png)" in body
    assert "merge_method: ties" in body and "```yaml" in body
    assert "**warn**: nothing — code is the outlier" in body
    assert "mergekit's own README" not in text  # the card replaces mergekit's README


def test_card_without_evaluation_has_no_model_index(tmp_path: Path) -> None:
    out = make_merged_dir(tmp_path, evaluation=False)
    card = render_card(out)
    meta = card.data.to_dict()
    assert "model-index" not in meta and "observed" not in meta["mergeability"]
    assert "Predicted vs observed" not in card.text
    assert meta["mergeability"]["verdict"] == "mergeable"


def test_card_uses_only_the_base_when_no_constituent_is_a_hub_id(tmp_path: Path) -> None:
    report = make_report()
    for m in report.models:
        m.name = f"./ckpt/{m.task}"
    report.weights = {m.name: 1 / 3 for m in report.models}
    out = make_merged_dir(tmp_path, evaluation=False, report=report)
    assert render_card(out).data.base_model == "acme/llama-base"


def test_custom_template_keeps_the_metadata(merged_dir: Path, tmp_path: Path) -> None:
    tpl = tmp_path / "mine.md.j2"
    tpl.write_text("# {{ model_name }}: {{ report.verdict }} ({{ rows | length }} models)\n")
    path = write_card(merged_dir, template=tpl)
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    assert card.text.strip() == "# merged: mergeable (3 models)"
    assert card.data.mergeability["verdict"] == "mergeable"
    assert card.data.base_model_relation == "merge"
    assert {r.dataset_type for r in card.data.eval_results} == {"sst2", "gsm8k"}


def test_hub_cards_template_is_the_packaged_one() -> None:
    assert (REPO_ROOT / "hub_cards" / "mergeability_card.md.j2").read_text() == \
        default_template_path().read_text()


def test_missing_report_and_bad_evaluation_are_bad_input(tmp_path: Path, merged_dir: Path) -> None:
    with pytest.raises(BadInputError, match="report.json"):
        render_card(tmp_path / "nothing")
    (merged_dir / "mergeability" / "evaluation.json").write_text('{"tasks": [{"model": 1}]}')
    with pytest.raises(BadInputError, match="evaluation.json"):
        render_card(merged_dir)


def test_cli_card(merged_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["card", str(merged_dir)])
    assert res.exit_code == 0, res.output
    assert str(merged_dir / "README.md") in res.output
    assert "mergeability:" in (merged_dir / "README.md").read_text()

    res = CliRunner().invoke(main, ["card", str(tmp_path / "missing")])
    assert res.exit_code == EXIT_BAD_INPUT
    assert "Traceback" not in res.output


def test_display_names_hub_ids_relative_paths_and_adapter_folders(tmp_path: Path) -> None:
    from mergekit_collapse.guard.report import display_names

    root, other = tmp_path / "recipes", tmp_path / "elsewhere"
    ft, base = root / "models" / "ft", other / "base"
    adapters = [other / "a" / "adapter", other / "b" / "adapter"]
    for folder in (ft, base, *adapters):
        folder.mkdir(parents=True)
    refs = ["acme/llama@main", str(ft), str(base), f"{ft}+{adapters[0]}", f"{ft}+{adapters[1]}",
            f"{base}+{tmp_path / 'sentiment'}", "./zoo/ft3"]
    assert display_names(refs, root) == {
        "acme/llama@main": "acme/llama@main",  # a Hub id (and its revision) as it is
        str(ft): "models/ft",  # inside the config's folder: relative to it
        str(base): "base",  # outside: its folder's name
        refs[3]: "models/ft+a/adapter", refs[4]: "models/ft+b/adapter",  # a clash: more of the path
        refs[5]: "base+sentiment",
        "./zoo/ft3": "./zoo/ft3",  # relative: as the config writes it
    }
    assert display_names([str(ft)]) == {str(ft): "ft"}


def test_card_of_a_merge_of_local_folders_publishes_no_local_path(tmp_path: Path) -> None:
    """Local folders show as display names; the lineage comes from what the checkpoints record."""
    import yaml
    from common import make_finetune, make_lora, make_tiny_llama

    from mergekit_collapse import check
    from mergekit_collapse.publish.card import load_card_metadata

    base = make_tiny_llama(tmp_path / "models" / "base")
    ft = make_finetune(base, tmp_path / "downloads" / "ft", seed=1)
    lora = make_lora(base, tmp_path / "models" / "adapters" / "sentiment", seed=2)
    # as downloaded from the Hub: the fine-tune's config and the adapter's base name Hub ids
    config = json.loads((ft / "config.json").read_text())
    (ft / "config.json").write_text(json.dumps({**config, "_name_or_path": "acme/tiny-ft"}))
    adapter = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(
        json.dumps({**adapter, "base_model_name_or_path": "acme/tiny-base"}))
    refs = [str(ft), f"{base}+{lora}"]
    source = yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
        "models": [{"model": r, "parameters": {"weight": 0.5}} for r in refs],
        "guard": {"k": 1, "rehearse": "off", "tasks": {
            r: {"name": name, "probes": {"file": str(tmp_path / f"{name}.txt")}}
            for r, name in zip(refs, ["ft", "sentiment"], strict=True)}}})
    for name in ("ft", "sentiment"):
        (tmp_path / f"{name}.txt").write_text("one probe\nanother probe\n")
    (tmp_path / "merge.yml").write_text(source)
    report = check(tmp_path / "merge.yml", absolute_budget=1e9, runtime=QUIET)
    report.notes.append(f"an adapter was read from {lora}")  # free text names local paths too
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mergekit_config.yml").write_text(source)
    report.write(out / "mergeability")
    (out / "mergeability" / "evaluation.json").write_text(json.dumps({"limit": 4, "tasks": [
        {"model": refs[1], "task": "sentiment", "eval": "zoo_sentiment", "metric": "acc",
         "constituent": 0.9, "merged": 0.8, "loss": -11.1}]}))

    readme = write_card(out)
    text = readme.read_text()
    meta = load_card_metadata(readme)
    assert str(tmp_path) not in text and str(tmp_path) not in json.dumps(meta)
    assert meta["base_model"] == ["acme/tiny-ft", "acme/tiny-base"]  # the parents' Hub ids
    names = [m["name"] for m in meta["mergeability"]["models"]]
    assert names == ["downloads/ft", "models/base+sentiment"]
    assert meta["mergeability"]["observed"]["tasks"][0]["model"] == "models/base+sentiment"
    assert "| `models/base+sentiment` | sentiment |" in text and "on `models/base`" in text
    assert "- model: models/base+sentiment" in text  # the config shown names them the same way
    assert "an adapter was read from models/adapters/sentiment" in text
    # the local report keeps the paths, and says how each model is shown
    local = GuardReport.read(out / "mergeability")
    assert [(m.name, m.display) for m in local.models] == [
        (refs[0], "downloads/ft"), (refs[1], "models/base+sentiment")]


def test_card_opening_names_the_signal_that_decided(tmp_path: Path) -> None:
    """The rehearsal decided: the opening line says so, not that the geometry predicts it."""
    report = make_report(verdict="collapse").model_copy(update={"decided_by": "rehearsal"})
    text = str(render_card(make_merged_dir(tmp_path, report=report)))
    assert "a rehearsal (this merge made in memory, answering each model's probes) decided" in text
    assert "geometry" not in text.split("**Verdict")[0]
    assert "### History" not in text


def test_the_card_heads_with_the_merge_it_ships(tiny_zoo, tmp_path: Path) -> None:
    """A real guarded merge whose drop re-organises the set: the card and its `mergeability:`
    metadata carry the re-checked verdict of the two models merged; the three-model config as
    written and the drop follow as history."""
    import yaml
    from test_integration import BUDGET, config

    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config(tiny_zoo, ["ft1", "ft2", "ft3"]), sort_keys=False))
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["merge", str(path), str(out), "--guard-action", "drop",
                                    "--guard-absolute-budget", BUDGET, "--quiet"])
    assert res.exit_code == 0, res.output
    assert f"shipped merge {out} (2 models), re-checked: mergeable" in res.output
    written = GuardReport.read(out / "mergeability")
    shipped = GuardReport.read(out / "mergeability" / "shipped")
    assert (written.verdict, len(written.models)) == ("collapse", 3)
    assert (shipped.verdict, [Path(n).name for n in shipped.names]) == ("mergeable", ["ft1", "ft2"])
    assert shipped.rehearsal is not None and shipped.rehearsal.status == "ran"

    from mergekit_collapse.schemas import CardMetadata

    meta = load_card_metadata(write_card(out))["mergeability"]
    CardMetadata.model_validate({"mergeability": meta})  # the shipped card schema holds history
    assert (meta["verdict"], meta["decided_by"]) == (shipped.verdict, shipped.decided_by)
    assert [m["name"] for m in meta["models"]] == ["ft1", "ft2"]
    assert meta["history"] == {"verdict": "collapse", "decided_by": written.decided_by,
                               "models": ["ft1", "ft2", "ft3"]}
    assert [a["action"] for a in meta["actions"]] == ["drop"]
    text = (out / "README.md").read_text()
    head, history = text.split("### History")
    assert "**Verdict: mergeable**" in head and "merge of 2 models" in head
    assert "the merge shipped here" in head and "**Verdict: collapse**" not in text
    assert "merged 3 models: **verdict collapse**" in history
    assert "**drop**: dropped ft3" in history


def test_a_split_groups_card_heads_with_its_group(tiny_zoo, tmp_path: Path) -> None:
    """split --guard-merge-all: a merged group's folder gets the config as written and its own
    re-check, and its card heads with the group."""
    import yaml
    from test_integration import BUDGET, config

    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config(tiny_zoo, ["ft1", "ft2", "ft3"]), sort_keys=False))
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["merge", str(path), str(out), "--guard-action", "split",
                                    "--guard-merge-all", "--guard-absolute-budget", BUDGET,
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    shipped = {p.parent.parent.parent.name: GuardReport.read(p.parent)
               for p in sorted(out.glob("group-*/mergeability/shipped/report.json"))}
    pair = next(name for name, r in shipped.items() if len(r.models) == 2)
    assert [Path(n).name for n in shipped[pair].names] == ["ft1", "ft2"]
    assert shipped[pair].verdict == "mergeable"
    meta = load_card_metadata(write_card(out / pair))["mergeability"]
    assert meta["verdict"] == "mergeable" and meta["history"]["verdict"] == "collapse"
    assert len(meta["history"]["models"]) == 3
