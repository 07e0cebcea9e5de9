"""JSON Schemas of what we read and write, generated from the pydantic models.

- `guard`: a mergekit YAML with our `guard:` section (mergekit's own keys are left to mergekit).
- `report`: `report.json` (`GuardReport`).
- `card`: the metadata of the mergeability card (`mergeability:` and the Hub keys beside it).

Copies ship in `mergekit_collapse/schemas/` so editors (`# yaml-language-server: $schema=...`) and
`check-jsonschema --schemafile` can use them without running any code.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mergekit_collapse.guard.report import RehearsalInfo, RiskInfo

__all__ = ["NAMES", "CardMetadata", "build", "shipped_path"]

NAMES = ("guard", "report", "card")
DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CardBudget(_Card):
    mode: str
    value: float | None
    absolute: float | None
    scale: float | None = None
    scale_source: str | None = None


class CardBounds(_Card):
    diameter: float | None
    converse: float | None
    exact: float | None
    jung: float | None
    jung_n: int
    jung_dim: str
    uniform: float | None
    planned: float | None = None


class CardModel(_Card):
    name: str
    task: str
    mds: float | None = Field(description="Eq. 3; .inf when the mean HiddenSim is 0")
    distortion: float | None
    distortion_planned: float | None = None
    retention: float | None = None
    weight: float | None = None
    risk_score: float | None = None
    risk_band: str | None = None
    predicted_retention: float | None = None
    rehearsal_band: str | None = None


class CardProbes(_Card):
    sha256: str
    count: int
    k: int
    seed: int
    chat_template: bool


class CardAction(_Card):
    action: str
    changed: str
    reason: str


class CardObservedTask(_Card):
    model: str
    task: str
    eval: str | None = None
    metric: str | None = None
    constituent: float | None = None
    merged: float | None = None
    base: float | None = None
    loss: float | None = Field(default=None, description="merging loss, Eq. 1, in %")
    observed_retention: float | None = None


class CardObserved(_Card):
    limit: int | None = None
    dtype: str | None = None
    mean_loss: float | None = None
    tasks: list[CardObservedTask] = Field(default_factory=list)


class CardHistory(_Card):
    """The config as written, before an action re-organised it into the merge the card describes."""

    verdict: str
    decided_by: str
    models: list[str] = Field(description="its models, by display name")


class Mergeability(_Card):
    """The card's `mergeability:` block (`card.mergeability_metadata`)."""

    schema_version: str
    tool_version: str
    card_tool_version: str
    verdict: str = Field(description="mergeable | collapse (newer tools may add verdicts)")
    decided_by: str
    merge_method: str
    budget: CardBudget
    bounds: CardBounds
    models: list[CardModel]
    probes: CardProbes
    layer: int
    pooling: str
    actions: list[CardAction] = Field(default_factory=list)
    risk: RiskInfo | None = None
    rehearsal: RehearsalInfo | None = None
    observed: CardObserved | None = None
    history: CardHistory | None = Field(default=None, description=(
        "when an action re-organised the config: the verdict on the config as written (the verdict "
        "above is the guard's on the merge shipped)"))


class CardMetadata(BaseModel):
    """A mergeability card's YAML metadata: the Hub's own keys are allowed beside `mergeability`."""

    model_config = ConfigDict(extra="allow")

    mergeability: Mergeability
    base_model: str | list[str] | None = None
    base_model_relation: str | None = None
    tags: list[str] | None = None
    library_name: str | None = None


def _loader_rules(guard: dict[str, Any], defs: dict[str, Any]) -> None:
    """What the loader enforces beyond the field types, said in the schema too: the actions this
    installation knows, a budget that is relative or absolute (not both), at least one task."""
    from mergekit_collapse.guard.config import action_names

    guard["properties"]["action"]["enum"] = action_names()
    guard["properties"]["tasks"]["minProperties"] = 1
    guard["required"] = ["tasks"]
    defs["Budget"]["not"] = {"required": ["relative", "absolute"],
                             "properties": {"relative": {"type": "number"},
                                            "absolute": {"type": "number"}}}


def _guard() -> dict[str, Any]:
    from mergekit_collapse.guard.config import GuardSettings

    guard = GuardSettings.model_json_schema()
    defs = guard.pop("$defs", {})
    _loader_rules(guard, defs)
    return {
        "title": "mergekit config with a mergekit-collapse guard: section",
        "description": "A mergekit YAML (its own keys are validated by mergekit) plus the optional "
                       "`guard:` section of mergekit-collapse.",
        "type": "object",
        "properties": {"merge_method": {"type": "string"},
                       "guard": {"$ref": "#/$defs/GuardSettings"}},
        "required": ["merge_method"],
        "additionalProperties": True,
        "$defs": {**defs, "GuardSettings": guard},
    }


def build(name: str) -> dict[str, Any]:
    """The JSON Schema `name` (guard, report or card), draft 2020-12.

    Raises:
        KeyError: an unknown name.
    """
    from mergekit_collapse.guard.report import GuardReport

    if name == "guard":
        schema = _guard()
    elif name == "report":
        schema = GuardReport.model_json_schema(mode="serialization")
    elif name == "card":
        schema = CardMetadata.model_json_schema(mode="serialization")
    else:
        raise KeyError(name)
    return {"$schema": DIALECT, **schema}


def shipped_path(name: str) -> Path:
    """The packaged copy of schema `name` (`mergekit_collapse/schemas/<name>.schema.json`)."""
    return Path(str(resources.files("mergekit_collapse") / "schemas" / f"{name}.schema.json"))
