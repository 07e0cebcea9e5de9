"""Read a mergekit YAML with mergekit's own `MergeConfiguration`, plus our top-level `guard:` section."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_collapse.errors import BadInputError, ConfigError, ModelNotFoundError

Pooling = Literal["mean", "last"]
#: the built-in actions (mergekit_collapse.actions); other packages add theirs through this group
BUILTIN_ACTIONS = ("abort", "warn", "drop", "split", "replace", "order")
ACTION_ENTRY_POINTS = "mergekit_collapse.actions"
Rehearse = Literal["auto", "on", "off"]


def _one_line(text: str) -> str:
    """A message from pydantic, mergekit or PyYAML on one line (errors print one line each)."""
    return " ".join(text.split())


def _did_you_mean(word: str, options: list[str]) -> str:
    near = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean '{near[0]}'?" if near else ""


def action_names() -> list[str]:
    """The built-in actions, then those other installed packages register (entry points)."""
    from importlib.metadata import entry_points

    extra = sorted({ep.name for ep in entry_points(group=ACTION_ENTRY_POINTS)} - set(BUILTIN_ACTIONS))
    return [*BUILTIN_ACTIONS, *extra]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProbeFile(_Strict):
    """Probes read from a JSONL (one object a line) or text file (one probe a line)."""

    file: str
    field: str = "text"


class ProbeLmEval(_Strict):
    """Probes drawn from an lm-eval task's documents (its `doc_to_text`)."""

    lm_eval: str
    include_path: str | None = None


class TaskSpec(_Strict):
    """What one constituent model was fine-tuned for, how to probe it and how to evaluate it."""

    name: str
    probes: list[str] | ProbeFile | ProbeLmEval | None = None
    eval: str | None = Field(default=None, description="lm-eval task name, or path to a task YAML")


class Budget(_Strict):
    """Distortion budget: `relative` to the base model's probe spread, or `absolute`.

    Neither given: the calibrated default relative budget (`mergekit-collapse calibrate`).
    """

    relative: float | None = Field(default=None, gt=0, allow_inf_nan=False, description=(
        "distortion budget as a multiple of the base model's probe spread"))
    absolute: float | None = Field(default=None, gt=0, allow_inf_nan=False, description=(
        "distortion budget in squared hidden-state units"))

    @model_validator(mode="after")
    def _at_most_one(self) -> Budget:
        if self.relative is not None and self.absolute is not None:
            raise ValueError("budget takes exactly one of `relative` or `absolute`")
        return self


class GuardSettings(_Strict):
    """The `guard:` section of a mergekit YAML. CLI flags override it."""

    tasks: dict[str, TaskSpec] = Field(default_factory=dict, description=(
        "per constituent model, keyed by its reference exactly as written under models: its task, "
        "probes and evaluation"))
    k: int = Field(default=5, ge=1, description="probes per task")
    seed: int = Field(default=0, description="seed of the probe sampling (per task) and the rehearsal")
    layer: int = Field(default=-1, description="hidden layer; -1 = last (final-norm output)")
    # benchmarks/RESULTS.md: last-token pooling predicted loss better
    pooling: Pooling = Field(default="last", description=(
        "a probe's vector: its last token's hidden state (last) or the mean over its tokens (mean)"))
    chat_template: bool = Field(default=True, description=(
        "wrap probes in the tokenizer's chat template when it has one"))
    max_length: int = Field(default=256, ge=8, description="probe token limit")
    batch_size: int = Field(default=16, ge=1, description="probes per forward pass")
    budget: Budget = Field(default_factory=Budget, description=(
        "distortion budget, relative or absolute; neither: the calibrated default"))
    jung_dim: Literal["affine", "hidden"] = Field(default="affine", description=(
        "dimension n in Jung's bound: affine, n = min(P·d, N-1), or hidden, the paper's n = d"))
    action: str = Field(default="abort", description=(
        "what to do when the merge is predicted to collapse: " + ", ".join(BUILTIN_ACTIONS)
        + f", or an action registered in the '{ACTION_ENTRY_POINTS}' entry-point group"),
        json_schema_extra={"examples": list(BUILTIN_ACTIONS)})
    candidates: dict[str, list[str]] = Field(default_factory=dict, description=(
        "action replace: per task name, the model references that may stand in for its model"))
    weights: Literal["none", "suggest", "apply"] = Field(default="none", description=(
        "distortion-optimal weights α*: suggest (write a config with them) or apply (merge with "
        "them; linear/task-arithmetic family)"))
    base: str | None = Field(default=None, description=(
        "the common base model the constituents were fine-tuned from (the risk score's anchor), "
        "for configs that do not name it: e.g. a linear merge of full fine-tunes"))
    rehearse: Rehearse = Field(default="auto", description=(
        "merge in memory and compare the merged model's answers on the probes with each "
        "constituent's; auto: when the inputs weigh at most rehearse_max_gb"))
    rehearse_max_gb: float = Field(default=8.0, gt=0, description=(
        "auto rehearsal only when the merge's distinct input weights total at most this"))
    answer_tokens: int = Field(default=32, ge=1, le=512, description=(
        "longest greedy answer the rehearsal compares, in tokens"))

    @field_validator("action")
    @classmethod
    def _known_action(cls, value: str) -> str:
        names = action_names()
        if value not in names:
            raise ValueError(f"unknown action {value!r}{_did_you_mean(value, names)}; "
                             f"choose one of {', '.join(names)}")
        return value

    @field_validator("rehearse", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted `on`/`off` as a boolean."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


@dataclass
class LoadedConfig:
    """A parsed config: mergekit's own model, our guard settings, and the models in YAML order."""

    path: Path | None
    source: str
    merge: Any  # mergekit.config.MergeConfiguration
    guard: GuardSettings
    models: list[Any]  # constituent mergekit ModelReference, in YAML order, base excluded
    base: Any | None  # the anchor p_0: mergekit ModelReference or None (see `find_base`)
    base_source: str | None = None  # where the anchor came from, or why there is none

    def task_of(self, model: Any) -> TaskSpec:
        """The TaskSpec of a constituent model, matched by mergekit's own parse of the key."""
        for key, spec in self.guard.tasks.items():
            if parse_ref(key) == model:
                return spec
        raise ConfigError(f"guard.tasks has no entry for model '{model}'")

    def resolve(self, relative: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        p = Path(relative).expanduser()
        if p.is_absolute() or self.path is None:
            return p
        return self.path.parent / p


def parse_ref(value: Any) -> Any | None:
    """mergekit's own parse of a model reference (a string or a mapping), or None if it is not one
    (mergekit accepts a blank string; no model is named so)."""
    from mergekit.common import ModelReference

    if isinstance(value, str) and not value.strip():
        return None
    try:
        return ModelReference.model_validate(value)
    except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        return None


def _friendly(err: ValidationError, allowed: dict[tuple, list[str]]) -> str:
    """One line for the first pydantic error; unknown keys get a did-you-mean."""
    errors = err.errors()
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    loc = tuple(first.get("loc", ()))
    where = ".".join(str(x) for x in loc)
    if first.get("type") == "extra_forbidden" and loc:
        key = str(loc[-1])
        options = allowed.get(tuple(type(x).__name__ for x in loc[:-1]), []) or _all_fields()
        return f"unknown key {'guard.' + where!r}{_did_you_mean(key, options)}"
    return f"invalid {'guard.' + where if loc else 'guard'}: {_one_line(str(first.get('msg')))}"


def _all_fields() -> list[str]:
    names: set[str] = set()
    for m in (GuardSettings, TaskSpec, Budget, ProbeFile, ProbeLmEval):
        names.update(m.model_fields)
    return sorted(names)


def endpoint_base(method: str) -> bool:
    """Whether `method`'s base_model is one of two models it interpolates (slerp, nearswap,
    arcee_fusion: mergekit's contract requires a base and takes exactly two inputs), so the base is
    a constituent with a task of its own rather than the common ancestor."""
    import mergekit.merge_methods as methods

    try:
        contract = methods.get(method).spec.contract
    except RuntimeError:  # an unknown method: mergekit's own validation reports it
        return False
    return contract.max_inputs == 2 and contract.base.value == "required"


def ordered_models(merge: Any) -> list[Any]:
    """Constituent models in the order the YAML lists them (mergekit's referenced_models() is a set).

    The base model is left out, except where it is an interpolation endpoint (`endpoint_base`).
    """
    seen: list[Any] = []
    skip = None if endpoint_base(merge.merge_method) else merge.base_model

    def add(ref: Any) -> None:
        if ref is not None and ref not in seen and ref != skip:
            seen.append(ref)

    if skip is None:
        add(merge.base_model)

    for m in merge.models or []:
        add(m.model)
    for s in merge.slices or []:
        for src in s.sources:
            add(src.model)
    for mod in (merge.modules or {}).values():
        for m in mod.models or []:
            add(m.model)
        for s in mod.slices or []:
            for src in s.sources:
                add(src.model)
    return seen


def find_base(merge: Any, guard: GuardSettings, models: list[Any]) -> tuple[Any | None, str]:
    """The anchor p_0 of the risk score, and where it came from (or why there is none).

    In order: `guard.base`; mergekit's `base_model` when it is the common ancestor (not an
    interpolation endpoint); the base every constituent's `base+lora` reference shares.
    """
    from mergekit.common import ModelReference

    if guard.base is not None:
        if (ref := parse_ref(guard.base)) is None:
            raise ConfigError(f"guard.base {guard.base!r} is not a model reference")
        return ref, "guard.base"
    if merge.base_model is not None and merge.base_model not in models:
        return merge.base_model, "base_model"
    bases = {m.model for m in models if m.lora is not None}
    if models and len(bases) == 1 and all(m.lora is not None for m in models):
        return ModelReference(model=bases.pop()), "the base of every base+lora reference"
    if any(m.lora is None for m in models) or len(bases) > 1:
        why = ("the models share no base+lora base and the config names no base_model; "
               "set guard.base to the model they were fine-tuned from")
    else:
        why = "no constituent models"
    return None, why


def parse_config(source: str, path: Path | None = None) -> LoadedConfig:
    """Parse YAML text into a LoadedConfig.

    Args:
        source: the YAML text (a mergekit config, optionally with a `guard:` section).
        path: the file it came from; relative probe paths resolve against its folder.

    Returns:
        The parsed config.

    Raises:
        ConfigError: malformed YAML, an invalid mergekit config, or an invalid guard section.
    """
    from mergekit.config import MergeConfiguration

    where = f"{path}: " if path else ""
    try:
        raw = yaml.safe_load(source)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}malformed YAML{at}: {_one_line(str(getattr(e, 'problem', e)))}"
                          ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}a mergekit config must be a YAML mapping")
    guard_raw = raw.pop("guard", None) or {}
    try:
        merge = MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError, ValueError) as e:
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise ConfigError(f"{where}invalid mergekit config: {_one_line(msg)}") from None
    try:
        guard = GuardSettings.model_validate(guard_raw)
    except ValidationError as e:
        raise ConfigError(where + _friendly(e, {})) from None
    models = ordered_models(merge)
    base, base_source = find_base(merge, guard, models)
    cfg = LoadedConfig(path=path, source=source, merge=merge, guard=guard, models=models,
                       base=base, base_source=base_source)
    known = {str(m) for m in models}
    for key in guard.tasks:
        if (ref := parse_ref(key)) is None:
            raise ConfigError(f"{where}guard.tasks key {key!r} is not a model reference")
        if ref not in models:
            raise ConfigError(f"{where}guard.tasks names {key!r}, which is not a model of this "
                              f"merge{_did_you_mean(key, sorted(known))}")
    return cfg


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's content, or a one-line BadInputError naming `what` it was.

    Raises:
        ModelNotFoundError: the file is missing (a FileNotFoundError too).
        BadInputError: unreadable or not UTF-8.
    """
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelNotFoundError(f"{what} file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read {what} {p}: {e}") from None


def load_config(path: str | Path) -> LoadedConfig:
    """Read and parse a mergekit YAML file (see `parse_config`).

    Raises:
        ModelNotFoundError: the file is missing.
        BadInputError: the file is unreadable. ConfigError: its content is invalid.
    """
    return parse_config(read_text(path, "config"), Path(path).resolve())


def with_guard(cfg: LoadedConfig, guard: GuardSettings) -> LoadedConfig:
    """The same config with other guard settings (the anchor follows a changed `guard.base`)."""
    if guard.base == cfg.guard.base:
        return replace(cfg, guard=guard)
    base, source = find_base(cfg.merge, guard, cfg.models)
    return replace(cfg, guard=guard, base=base, base_source=source)
