"""The mergeability card: rendering, metadata round trip through `ModelCard.load`, custom templates, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_collapse.cli import main
from mergekit_collapse.errors import EXIT_BAD_INPUT, BadInputError
from mergekit_collapse.guard.report import (
    Action,
    Bounds,
    BudgetInfo,
    Distances,
    GuardReport,
    ModelEntry,
    ProbeInfo,
)
from mergekit_collapse.publish.card import default_template_path, render_card, write_card

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ["acme/llama-sentiment", "acme/llama-math", "/local/ckpt/llama-code"]
MERGEKIT_YAML = """\
merge_method: ties
base_model: acme/llama-base
models:
  - model: acme/llama-sentiment
    parameters: {weight: 0.5, density: 0.5}
  - model: acme/llama-math
    parameters: {weight: 0.5, density: 0.5}
dtype: float32
"""


def make_report(*, verdict: str = "mergeable") -> GuardReport:
    """A small but complete GuardReport (three models, one with infinite MDS, one action)."""
    rms = [[0.0, 1.0, 2.0], [1.0, 0.0, 1.5], [2.0, 1.5, 0.0]]
    return GuardReport(
        tool_version="0.1.0",
        config="merge.yml",
        merge_method="ties",
        base_model="acme/llama-base",
        models=[
            ModelEntry(name=MODELS[0], task="sentiment", mds=1.25, mean_hidden_sim=0.8,
                       distortion_optimal=0.5, distortion_uniform=0.6, retention=0.7),
            ModelEntry(name=MODELS[1], task="math", mds=1.5, mean_hidden_sim=0.66,
                       distortion_optimal=0.75, distortion_uniform=0.9),
            ModelEntry(name=MODELS[2], task="code", mds=float("inf"), mean_hidden_sim=0.0,
                       distortion_optimal=1.0, distortion_uniform=1.2),
        ],
        hidden_sim=[[1.0, 1.0, 0.0], [1.0, 1.0, 0.5], [0.0, 0.5, 1.0]],
        distances=Distances(mean=rms, rms=rms),
        bounds=Bounds(diameter=2.0, converse=1.0, jung=4 / 3, jung_n=2, jung_dim="affine",
                      exact=1.0, uniform=1.2),
        weights={MODELS[0]: 0.5, MODELS[1]: 0.0, MODELS[2]: 0.5},
        budget=BudgetInfo(mode="relative", value=0.5, absolute=1.1, scale=2.2,
                          scale_source="base spread"),
        verdict=verdict,
        decided_by="exact",
        probes=ProbeInfo(k=5, count=15, sha256="ab" * 32, seed=0, chat_template=True),
        layer=-1,
        pooling="last",
        dtype="float32",
        hidden_size=32,
        actions=[Action(action="warn", changed="nothing", reason="code is the outlier")],
    )


EVALUATION = {
    "schema_version": "1.0", "limit": 50, "mean_loss": -20.1,
    "tasks": [
        {"model": MODELS[0], "task": "sentiment", "eval": "sst2", "metric": "acc",
         "constituent": 0.95, "merged": 0.6, "base": 0.5, "loss": -36.8, "observed_retention": 0.4},
        {"model": MODELS[1], "task": "math", "eval": "gsm8k", "metric": "exact_match",
         "constituent": 0.3, "merged": 0.29, "base": 0.1, "loss": -3.3},
    ],
}


def make_merged_dir(root: Path, *, evaluation: bool = True, lfs_size: int = 0,
                    report: GuardReport | None = None) -> Path:
    """A fake mergekit output folder: tiny weights/config/tokenizer files + mergeability/ outputs.

    `lfs_size` > 0 adds `model-00002-of-00002.safetensors` of that many (seeded random) bytes.
    """
    import random

    out = root / "merged"
    out.mkdir(parents=True)
    rng = random.Random(0)
    (out / "model-00001-of-00002.safetensors").write_bytes(rng.randbytes(2048))
    if lfs_size:
        (out / "model-00002-of-00002.safetensors").write_bytes(rng.randbytes(lfs_size))
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (out / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (out / "tokenizer_config.json").write_text("{}")
    (out / "mergekit_config.yml").write_text(MERGEKIT_YAML)
    (out / "README.md").write_text("---\ntags: [merge, mergekit]\n---\n# merged\nmergekit's own README\n")
    (report or make_report()).write(out / "mergeability")
    if evaluation:
        (out / "mergeability" / "evaluation.json").write_text(json.dumps(EVALUATION))
        (out / "mergeability" / "predicted_vs_observed.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    return out


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
    assert [(x["name"], x["task"]) for x in m["models"]] == list(zip(MODELS, ["sentiment", "math", "code"],
                                                                     strict=True))
    assert [x["mds"] for x in m["models"]][:2] == [1.25, 1.5]
    # report.json itself writes inf as null (pydantic's JSON default), so the card shows what it read
    assert m["models"][2]["mds"] == GuardReport.read(merged_dir / "mergeability").models[2].mds
    assert [x["distortion"] for x in m["models"]] == [0.5, 0.75, 1.0]
    assert m["probes"]["sha256"] == "ab" * 32
    assert m["layer"] == -1 and m["pooling"] == "last"
    assert m["actions"] == [{"action": "warn", "changed": "nothing", "reason": "code is the outlier"}]
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


def test_card_body_has_heatmap_table_prediction_and_config(merged_dir: Path) -> None:
    text = write_card(merged_dir).read_text()
    body = text.split("\n---\n", 1)[1]
    assert "![HiddenSim heatmap](mergeability/hidden_sim.png)" in body
    assert (merged_dir / "mergeability" / "hidden_sim.png").is_file()
    assert "| `acme/llama-sentiment` | sentiment | 1.25 |" in body
    assert "| `/local/ckpt/llama-code` | code | — |" in body  # inf read back from JSON as null
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
