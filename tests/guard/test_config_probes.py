"""Config parsing (mergekit's own MergeConfiguration + guard section) and probe sampling."""

from __future__ import annotations

import json

import pytest
import yaml

from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.config import load_config, parse_config
from mergekit_collapse.guard.probes import build_probes, format_probes

CONFIG = {
    "merge_method": "ties",
    "base_model": "org/base",
    "models": [{"model": "org/a", "parameters": {"weight": 0.5, "density": 0.5}},
               {"model": "org/base+org/lora-b", "parameters": {"weight": 0.5, "density": 0.5}}],
    "guard": {
        "tasks": {"org/a": {"name": "cola", "probes": [f"a{i}" for i in range(10)]},
                  "org/base+org/lora-b": {"name": "wnli",
                                          "probes": {"file": "b.jsonl", "field": "text"}}},
        "k": 3,
        "budget": {"absolute": 12.0},
    },
}


def write(tmp_path, cfg=CONFIG):
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"b{i}"}) + "\n"
                                              for i in range(6)))
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_mergekit_references_and_guard(tmp_path):
    cfg = load_config(write(tmp_path))
    assert [str(m) for m in cfg.models] == ["org/a", "org/base+org/lora-b"]
    assert cfg.models[1].lora is not None and str(cfg.base) == "org/base"
    assert cfg.task_of(cfg.models[1]).name == "wnli"
    assert cfg.guard.budget.absolute == 12.0 and cfg.guard.budget.relative is None
    assert cfg.guard.jung_dim == "affine" and cfg.guard.action == "abort"


def test_slices_are_understood():
    cfg = parse_config(yaml.safe_dump({
        "merge_method": "slerp", "base_model": "m/x",
        "slices": [{"sources": [{"model": "m/x", "layer_range": [0, 2]},
                                {"model": "m/y", "layer_range": [0, 2]}]}],
        "parameters": {"t": 0.5}}))
    # slerp's base_model is one of the two models it interpolates: both are constituents
    assert [str(m) for m in cfg.models] == ["m/x", "m/y"]
    assert cfg.base is None and "guard.base" in cfg.base_source


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["guard"].update(budgte={"relative": 1}),
     "unknown key 'guard.budgte'; did you mean 'budget'"),
    (lambda c: c["guard"]["tasks"]["org/a"].update(prbes=[]), "did you mean 'probes'"),
    (lambda c: c["guard"]["tasks"].update({"org/c": {"name": "x"}}), "not a model of this merge"),
    (lambda c: c["guard"].update(budget={"relative": 1, "absolute": 2}), "exactly one"),
    (lambda c: c["guard"].update(pooling="max"), "guard.pooling"),
    (lambda c: c.pop("merge_method"), "invalid mergekit config"),
])
def test_bad_configs_get_one_line_errors(tmp_path, mutate, message):
    cfg = json.loads(json.dumps(CONFIG))
    mutate(cfg)
    with pytest.raises(BadInputError, match=message.replace("(", r"\(")) as e:
        load_config(write(tmp_path, cfg))
    assert "\n" not in str(e.value)


def test_malformed_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yml").write_text("models: [\n")
    with pytest.raises(BadInputError, match="malformed YAML"):
        load_config(tmp_path / "bad.yml")
    with pytest.raises(BadInputError, match="not found"):
        load_config(tmp_path / "missing.yml")


def test_probes_seeded_per_task_union(tmp_path):
    cfg = load_config(write(tmp_path))
    p1, p2 = build_probes(cfg), build_probes(cfg)
    assert p1.texts == p2.texts and p1.sha256 == p2.sha256
    assert len(p1) == 6 and p1.tasks == ("cola",) * 3 + ("wnli",) * 3
    assert set(p1.texts[:3]) <= {f"a{i}" for i in range(10)}
    assert set(p1.texts[3:]) <= {f"b{i}" for i in range(6)}
    # a task's sample does not depend on the other tasks
    solo = build_probes(cfg, models=[cfg.models[0]])
    assert solo.texts == p1.texts[:3]
    other_seed = build_probes(parse_config(cfg.source.replace("k: 3", "k: 3\n  seed: 7"), cfg.path))
    assert other_seed.texts != p1.texts


def test_empty_probes_are_bad_input(tmp_path):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["guard"]["tasks"]["org/a"]["probes"] = ["  ", ""]
    with pytest.raises(BadInputError, match="no non-empty probes"):
        build_probes(load_config(write(tmp_path, cfg)))
    cfg["guard"]["tasks"]["org/a"]["probes"] = {"file": "nope.jsonl"}
    with pytest.raises(BadInputError, match="cannot read probe file"):
        build_probes(load_config(write(tmp_path, cfg)))


def test_chat_template_applied():
    from common import make_tokenizer

    tok = make_tokenizer()
    assert format_probes(["hi"], tok, True) == ["<|user|>hi</s><|assistant|>"]
    assert format_probes(["hi"], tok, False) == ["hi"]


def test_probes_from_lm_eval_task_docs(tmp_path):
    from common import make_tiny_tasks

    tasks = make_tiny_tasks(tmp_path)
    cfg = json.loads(json.dumps(CONFIG))
    cfg["guard"]["tasks"]["org/a"]["probes"] = {"lm_eval": "tiny_mc", "include_path": str(tasks)}
    probes = build_probes(load_config(write(tmp_path, cfg)))
    # doc_to_text of the task's test documents: "Is {i} even or odd?"
    assert len(probes.texts[:3]) == 3
    assert all(t.startswith("Is ") and t.endswith(" even or odd?") for t in probes.texts[:3])
    cfg["guard"]["tasks"]["org/a"]["probes"] = {"lm_eval": "no_such_task",
                                                "include_path": str(tasks)}
    with pytest.raises(BadInputError, match="cannot load lm-eval task"):
        build_probes(load_config(write(tmp_path, cfg)))
