"""Line and column of each model under `models:` / `slices:` / `modules:`, on real mergekit YAML
shapes."""

from __future__ import annotations

import pytest
import yaml

from mergekit_collapse.ci.locate import locate_key, locate_message, locate_model, model_sites

BLOCK = """\
# comment line
merge_method: ties   # trailing comment
base_model: org/base
models:
  # a comment inside the list
  - model: org/a
    parameters:
      weight: 0.5
  - model: "org/b"   # quoted
    parameters: {weight: 0.5}
"""

FLOW = """\
merge_method: linear
models: [{model: org/a, parameters: {weight: 1}}, {model: org/b, parameters: {weight: 1}}]
"""

ANCHORS = """\
merge_method: task_arithmetic
base_model: &base org/base
common: &common
  model: org/shared
  parameters: {weight: 0.3}
defs:
  - &b {model: org/b+org/lora-b, parameters: {weight: 0.5}}
models:
  - model: org/a
    parameters: {weight: 0.5}
  - *b
  - <<: *common
  - <<: *common
    model: org/c
"""

SLICES = """\
merge_method: slerp
base_model: org/a
slices:
  - sources:
      - model: org/a
        layer_range: [0, 12]
      - model: org/b   # the other one
        layer_range: [0, 12]
  - sources:
      - {model: org/a, layer_range: [12, 24]}
      - {model: org/b, layer_range: [12, 24]}
parameters: {t: 0.5}
"""

MAPPING_REF = """\
merge_method: linear
models:
  - model:
      model: {path: org/a}
      lora: {path: org/lora}
    parameters: {weight: 1}
"""


def at(source: str, name: str) -> tuple[int, int]:
    span = locate_model(source, name)
    assert span is not None, name
    return span.line, span.column


def test_block_style_with_comments():
    assert at(BLOCK, "org/a") == (6, 12)
    assert at(BLOCK, "org/b") == (9, 12)  # the quote opens the scalar
    site = next(s for s in model_sites(BLOCK) if s.value == "org/a")
    assert site.span.end_line == 6 and site.span.end_column == 17
    assert [s.where for s in model_sites(BLOCK)] == ["base_model", "models[0]", "models[1]"]


def test_flow_mapping_on_one_line():
    assert at(FLOW, "org/a") == (2, 18)
    assert at(FLOW, "org/b") == (2, 59)


def test_aliases_point_at_their_use_not_the_anchor():
    assert at(ANCHORS, "org/a") == (9, 12)
    assert at(ANCHORS, "org/b+org/lora-b") == (11, 5)  # `- *b`, not the anchor on line 7
    sites = [s for s in model_sites(ANCHORS) if s.where.startswith("models")]
    assert [(s.value, s.span.line) for s in sites] == [
        ("org/a", 9), ("org/b+org/lora-b", 11), ("org/shared", 12), ("org/c", 14)]
    # `<<: *common` is reported where it is merged in (line 12), `model: org/c` overrides it
    assert sites[2].span.column == 9


def test_slices_and_the_base_listed_among_them():
    sites = model_sites(SLICES)
    assert [(s.where, s.value, s.span.line) for s in sites] == [
        ("base_model", "org/a", 2),
        ("slices[0].sources[0]", "org/a", 5), ("slices[0].sources[1]", "org/b", 7),
        ("slices[1].sources[0]", "org/a", 10), ("slices[1].sources[1]", "org/b", 11)]
    assert at(SLICES, "org/b") == (7, 16)  # the first slice that lists it


def test_mapping_form_and_mergekit_equivalence():
    assert at(MAPPING_REF, "org/a+org/lora") == (4, 7)
    assert locate_model(BLOCK, "org/zzz") is None


@pytest.mark.parametrize("source", [BLOCK, FLOW, ANCHORS, SLICES, MAPPING_REF])
def test_every_located_value_is_what_yaml_reads_there(source):
    lines = source.splitlines()
    raw = yaml.safe_load(source)
    for site in model_sites(source):
        if isinstance(site.value, str) and site.where.startswith(("models", "slices")):
            text = lines[site.span.line - 1][site.span.column - 1:]
            # an alias or a merge key is reported where it is used; a plain value is on its line
            assert text.lstrip('"').startswith(site.value) or text.startswith(("*", "<<"))
    assert isinstance(raw, dict)


def test_keys_and_messages():
    src = ("merge_method: linear\nguard:\n  tasks:\n    org/a.v2: {name: t, probes: [x]}\n"
           "  taks: {}\n")
    assert locate_key(src, "guard.taks").line == 5
    assert locate_key(src, "guard.tasks.org/a.v2.probes").line == 4  # a key with a dot in it
    assert locate_message(src, "unknown key 'guard.taks'; did you mean 'tasks'?").line == 5
    assert locate_message(src, "malformed YAML at line 7: x").line == 7
    assert locate_message("models: [", "nothing quoted here") is None
