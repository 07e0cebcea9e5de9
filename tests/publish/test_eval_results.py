"""The evaluation as the Hub's `.eval_results/*.yaml`: built, written with the card, read back with
huggingface_hub's own parser, and pushed in the same commit as the weights and the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hub_server import TOKEN, FakeHub
from reports import EVALUATION, make_merged_dir

from mergekit_collapse.evaluate.observed import Evaluation
from mergekit_collapse.publish.card import load_card_metadata, read_evaluation, write_card
from mergekit_collapse.publish.eval_results import (
    EVAL_RESULTS_DIR,
    MARKER,
    eval_result_entries,
    read_eval_results,
    write_eval_results,
)
from mergekit_collapse.publish.hub import push

REPO = "alice/merged-model"


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    return make_merged_dir(tmp_path)


def test_entries_round_trip_through_the_hub_parser(merged: Path) -> None:
    evaluation = read_evaluation(merged / "mergeability" / "evaluation.json")
    entries = eval_result_entries(evaluation)
    paths = write_eval_results(merged, evaluation)

    assert [p.name for p in paths] == ["gsm8k.yaml", "sst2.yaml"]
    back = read_eval_results(merged)  # huggingface_hub's parse_eval_result_entries, file by file
    assert back == sorted(entries, key=lambda e: e.dataset_id)
    # the merged model's score, under the lm-eval task name, as the card's model-index has it
    assert {(e.dataset_id, e.task_id, e.value) for e in back} == {("sst2", "sst2", 0.6),
                                                                  ("gsm8k", "gsm8k", 0.29)}
    assert {e.notes for e in back} == {"acc, lm-eval limit 50, float32, "
                                       "merged with mergekit-collapse",
                                       "exact_match, lm-eval limit 50, float32, "
                                       "merged with mergekit-collapse"}
    # the file is what the Hub reads: a YAML list of {dataset: {id, task_id}, value, ...}
    text = (merged / EVAL_RESULTS_DIR / "sst2.yaml").read_text()
    assert text.startswith(MARKER + "\n")
    assert yaml.safe_load(text)[0]["dataset"] == {"id": "sst2", "task_id": "sst2"}
    # the constituent's score is no entry: the Hub would credit it to this model
    assert "0.95" not in text


def test_entries_match_the_cards_model_index(merged: Path) -> None:
    write_card(merged)
    index = load_card_metadata(merged / "README.md")["model-index"][0]["results"]
    from_card = {(r["dataset"]["type"], r["metrics"][0]["value"]) for r in index}
    assert {(e.dataset_id, e.value) for e in read_eval_results(merged)} == from_card


def test_one_entry_per_task_and_missing_scores_left_out() -> None:
    data = json.loads(json.dumps(EVALUATION))
    shared = {**data["tasks"][0], "model": "acme/other", "task": "polarity"}  # same lm-eval task
    missing = {**data["tasks"][1], "eval": "arc_easy", "merged": None}
    nan = {**data["tasks"][1], "eval": "hellaswag", "merged": float("nan")}
    evaluation = Evaluation.model_validate({**data, "limit": None, "tasks": [*data["tasks"], shared,
                                                                             missing, nan]})
    entries = eval_result_entries(evaluation)
    assert [e.dataset_id for e in entries] == ["sst2", "gsm8k"]
    assert entries[0].notes == "acc, lm-eval, float32, merged with mergekit-collapse"


def test_rewriting_replaces_our_files_and_keeps_the_users(merged: Path) -> None:
    write_card(merged)
    own = merged / EVAL_RESULTS_DIR / "my_benchmark.yaml"
    own.write_text("- dataset: {id: me/bench, task_id: default}\n  value: 1.0\n")
    data = {**EVALUATION, "tasks": EVALUATION["tasks"][1:]}
    (merged / "mergeability" / "evaluation.json").write_text(json.dumps(data))

    write_card(merged)
    written = sorted(p.name for p in (merged / EVAL_RESULTS_DIR).iterdir())
    assert written == ["gsm8k.yaml", "my_benchmark.yaml"]
    (merged / "mergeability" / "evaluation.json").unlink()
    write_card(merged)
    assert [e.dataset_id for e in read_eval_results(merged)] == ["me/bench"]
    own.unlink()
    assert write_eval_results(merged, None) == []
    assert not (merged / EVAL_RESULTS_DIR).exists()


def test_push_carries_eval_results_in_the_one_commit(hub: FakeHub, merged: Path,
                                                     tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download, parse_eval_result_entries

    write_card(merged)
    plan = push(merged, REPO, dry_run=True)
    planned = {f.path_in_repo for f in plan.files}
    assert {".eval_results/gsm8k.yaml", ".eval_results/sst2.yaml"} <= planned
    assert ".eval_results/sst2.yaml" in plan.to_text()

    result = push(merged, REPO, token=TOKEN)
    commits = [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]
    assert len(commits) == 1
    repo = hub.repos[REPO]
    assert len(repo.commits) == 2  # the Hub's initial .gitattributes, then ours
    snapshot = repo.commits[result.commit_oid]
    assert {"README.md", "model-00001-of-00002.safetensors", ".eval_results/sst2.yaml",
            ".eval_results/gsm8k.yaml"} <= set(snapshot)
    got = hf_hub_download(REPO, ".eval_results/sst2.yaml", endpoint=hub.url, token=TOKEN,
                          cache_dir=tmp_path / "dl")
    entries = parse_eval_result_entries(yaml.safe_load(Path(got).read_text()))
    assert [(e.dataset_id, e.value) for e in entries] == [("sst2", 0.6)]
