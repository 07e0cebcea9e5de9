"""Every shipped example config parses with mergekit's own MergeConfiguration and our guard
schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_collapse.guard.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "merge_configs").rglob("*.yml"))


def test_there_are_examples():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_example_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.models, "an example merges at least one model"
    # every constituent has a task with probes, so `check` can run on it
    for model in cfg.models:
        assert cfg.task_of(model).probes is not None
    # and every shape has the risk score's anchor: base_model, guard.base or a shared base+lora base
    assert cfg.base is not None, cfg.base_source


def test_paper_settings():
    root = Path(__file__).parent.parent / "merge_configs" / "paper"
    glue = load_config(root / "glue-qwen2.5-3b.yml")
    assert len(glue.models) == 8 and glue.merge.merge_method == "ties"
    assert {glue.task_of(m).name for m in glue.models} == {
        "cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "wnli"}
    lol = load_config(root / "lots-of-loras-mistral-7b.yml")
    assert len(lol.models) == 8 and all(m.lora is not None for m in lol.models)
    assert {str(m.model) for m in lol.models} == {"mistralai/Mistral-7B-Instruct-v0.2"}


def test_demo_yml_is_the_demo_command_config():
    from mergekit_collapse.demo.run import demo_config

    root = Path(__file__).parent.parent / "merge_configs"
    shipped = load_config(root / "demo.yml")
    generated = demo_config("./zoo", probe_root="../zoo")
    assert [str(m) for m in shipped.models] == [m["model"] for m in generated["models"]]
    assert shipped.guard.action == generated["guard"]["action"]
    assert shipped.merge.parameters == generated["parameters"]


def test_shapes_cover_every_config_shape():
    shapes = {p.stem: load_config(p) for p in CONFIGS if p.parent.name == "shapes"}
    methods = {c.merge.merge_method for c in shapes.values()}
    assert methods >= {"linear", "ties", "dare_ties", "slerp"}
    assert shapes["linear-loras"].merge.base_model is None
    assert "base+lora" in shapes["linear-loras"].base_source
    assert shapes["linear-full"].base_source == "guard.base"
    slerp = shapes["slerp-slices"]
    assert len(slerp.models) == 2 and slerp.merge.base_model in slerp.models
