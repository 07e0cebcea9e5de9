"""`mergekit-collapse schema`: the shipped JSON Schemas match the pydantic models and validate real
configs (every YAML in merge_configs/), a real report.json and a real card's metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ci_common import CALM, cli

from mergekit_collapse.schemas import NAMES, build, shipped_path

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "merge_configs").rglob("*.yml"))


@pytest.mark.parametrize("name", NAMES)
def test_shipped_schema_is_the_generated_one(name):
    res = cli("schema", name)
    assert res.exit_code == 0
    printed = json.loads(res.stdout)
    assert printed == build(name)
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(printed)
    assert json.loads(shipped_path(name).read_text()) == printed, (
        f"regenerate: mergekit-collapse schema {name} > "
        f"mergekit_collapse/schemas/{name}.schema.json")


def test_guard_schema_validates_every_example_config():
    validator = jsonschema.Draft202012Validator(json.loads(shipped_path("guard").read_text()))
    assert len(CONFIGS) >= 10
    for path in CONFIGS:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
        assert not errors, f"{path.name}: {errors[0].message}"
    # and it rejects what the guard rejects: an unknown key, a wrong type
    bad = yaml.safe_load(CALM)
    bad["guard"]["taks"] = {}
    assert not validator.is_valid(bad)
    bad = yaml.safe_load(CALM)
    bad["guard"]["k"] = "five"
    assert not validator.is_valid(bad)


def test_check_jsonschema_cli_on_the_examples():
    # the tool the README points editors and CI at, run as users run it
    exe = Path(sys.executable).parent / "check-jsonschema"
    res = subprocess.run([str(exe), "--schemafile", str(shipped_path("guard")), *map(str, CONFIGS)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_report_and_card_schemas_validate_real_outputs(tiny_zoo, tmp_path, monkeypatch):
    from ci_common import make_repo

    from mergekit_collapse.guard.report import GuardReport
    from mergekit_collapse.publish.card import mergeability_metadata

    repo = make_repo(tmp_path / "recipes", tiny_zoo)
    monkeypatch.chdir(repo)
    res = cli("check", "configs/risky.yml", "--out", "out", "--no-progress")
    assert res.exit_code == 3, res.output
    report_json = json.loads((repo / "out" / "report.json").read_text())
    jsonschema.Draft202012Validator(build("report")).validate(report_json)
    report = GuardReport.read(repo / "out")
    card = {"mergeability": mergeability_metadata(report), "tags": ["merge"],
            "base_model": "org/base", "base_model_relation": "merge"}
    card = yaml.safe_load(yaml.safe_dump(card))  # as the card's YAML front matter reads back
    card_validator = jsonschema.Draft202012Validator(build("card"))
    card_validator.validate(card)
    card["mergeability"]["bounds"]["exact"] = "big"
    assert not card_validator.is_valid(card)
