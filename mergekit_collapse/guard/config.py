"""Read a mergekit YAML with mergekit's own `MergeConfiguration`, plus our top-level `guard:`
section."""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_collapse._io import check_path
from mergekit_collapse.errors import BadInputError, ConfigError, ModelNotFoundError

if TYPE_CHECKING:
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "last"]
#: the built-in actions (mergekit_collapse.actions); other packages add theirs through this group
BUILTIN_ACTIONS = ("abort", "warn", "drop", "split", "replace", "order")
ACTION_ENTRY_POINTS = "mergekit_collapse.actions"
Rehearse = Literal["auto", "on", "off"]
#: how `mergekit-collapse plan` ranks candidates by their per-task predicted retention
PlanObjective = Literal["kept", "mean", "worst"]


def _one_line(text: str) -> str:
    """A message from pydantic, mergekit or PyYAML on one line (errors print one line each)."""
    return " ".join(text.split())


def did_you_mean(word: str, options: list[str]) -> str:
    """"; did you mean 'x'?" for the closest option (difflib), or "" when none is close."""
    near = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean '{near[0]}'?" if near else ""


def action_names() -> list[str]:
    """The built-in actions, then those other installed packages register (entry points)."""
    from importlib.metadata import entry_points

    registered = {ep.name for ep in entry_points(group=ACTION_ENTRY_POINTS)}
    extra = sorted(registered - set(BUILTIN_ACTIONS))
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


class PlanSpace(_Strict):
    """`guard.plan`: the search space of `mergekit-collapse plan` (the candidates are the models)."""  # noqa: E501 - pydantic puts this docstring in the JSON Schema

    methods: list[str] | None = Field(default=None, min_length=1, description=(
        "merge methods to try (default: linear, task_arithmetic, ties, dare_ties, della, "
        "breadcrumbs, model_stock, sce, karcher, each where mergekit's rules accept the subset)"))
    weights: list[float] = Field(default_factory=lambda: [0.5, 1.0], min_length=1, description=(
        "grid of the per-model `weight` (one value for every model of a candidate)"))
    densities: list[float] = Field(default_factory=lambda: [0.5], min_length=1, description=(
        "grid of `density` for the methods that take one (TIES, DARE, DELLA, breadcrumbs)"))
    ramps: list[list[float]] = Field(default_factory=list, description=(
        "per-layer ramps of the weights, each a list of factors from the first layer to the last "
        "(e.g. [0.5, 1.0]): a candidate's weight w is written as mergekit's gradient "
        "[w·0.5, w·1.0], interpolated over the layers; tried beside the flat weights for the "
        "methods whose weights are not normalised (a common ramp changes nothing under linear)"))
    must_include: list[str] = Field(default_factory=list, description=(
        "model references (as written under models:) every candidate keeps"))
    min_models: int = Field(default=2, ge=2, description="fewest models a candidate merges")
    rehearsals: int = Field(default=10, ge=0, description=(
        "most candidates rehearsed, refinement included (0: rank by the geometry alone)"))
    refine: int = Field(default=3, ge=0, description=(
        "of those, rehearsals spent refining the best candidate's weights with optuna's TPE"))
    confirm: int = Field(default=3, ge=0, description=(
        "the best of this many best rehearsed merges (a subset with a method) rehearsed again on "
        "a second sample of k probes per task and ranked on both samples: with k probes a task's "
        "agreement moves in steps of 1/k, so near-equal finalists are told apart by more answers "
        "(0: off)"))
    max_merges: int = Field(default=1, ge=1, description=(
        "at most this many merges: when the best merge keeps tasks apart, the next merge is "
        "planned over those (greedily, with the rehearsals left) and kept when it is predicted "
        "to keep two of its tasks or more"))
    seconds: float | None = Field(default=None, ge=0, description=(
        "time budget: no rehearsal starts once the plan has run this long (the geometry screen "
        "always completes; the best judged so far wins)"))
    objective: PlanObjective = Field(default="kept", description=(
        "kept: most tasks above the floor (then mean); mean: best mean retention; worst: best "
        "worst task. A task left out of the merge counts as lost (retention 0)"))
    floor: float | None = Field(default=None, ge=0, le=1, description=(
        "retention a task must exceed to count as kept (default: the calibrated rehearsal "
        "collapse edge)"))

    @field_validator("weights", "densities")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(not (v > 0) or v != v or v == float("inf") for v in values):
            raise ValueError("every grid value must be a finite number > 0")
        return values

    @field_validator("ramps")
    @classmethod
    def _ramps(cls, ramps: list[list[float]]) -> list[list[float]]:
        for r in ramps:
            if len(r) < 2 or any(not (v >= 0) or v == float("inf") for v in r) or not any(r):
                raise ValueError(f"ramp {r}: give two or more finite factors >= 0, not all 0")
        return ramps


class PlanSummary(_Strict):
    """`guard.planned`: how `mergekit-collapse plan` chose this config (its card shows it)."""

    objective: PlanObjective
    floor: float
    space: str = Field(description="the search space, in words")
    screened: int = Field(description="candidates screened with the geometry")
    rehearsed: int = Field(description="candidates rehearsed")
    why: str = Field(description="why this candidate won")
    predicted: dict[str, float] = Field(default_factory=dict, description=(
        "expected retention per task (at its rehearsal agreement; else the geometry's proxy)"))
    kept_apart: list[str] = Field(default_factory=list, description=(
        "tasks of the pool this merge leaves out (another merge of the plan, or served as their "
        "fine-tunes)"))
    other_merges: list[str] = Field(default_factory=list, description=(
        "the plan's other merges (guard.plan.max_merges > 1): their files and tasks"))
    seconds: float = Field(description="the planner's wall time")


class GuardSettings(_Strict):
    """The `guard:` section of a mergekit YAML. CLI flags override it."""

    tasks: dict[str, TaskSpec] = Field(default_factory=dict, description=(
        "per constituent model, keyed by its reference exactly as written under models: its task, "
        "probes and evaluation"))
    k: int = Field(default=5, ge=1, description="probes per task")
    seed: int = Field(default=0,
                      description="seed of the probe sampling (per task) and the rehearsal")
    layer: int = Field(default=-1, description="hidden layer; -1 = last (final-norm output)")
    # benchmarks/RESULTS.md: last-token pooling predicted loss better
    pooling: Pooling = Field(default="last", description=(
        "a probe's vector: its last token's hidden state (last) or the mean over its "
        "tokens (mean)"))
    chat_template: bool = Field(default=True, description=(
        "wrap probes, and lm-eval's prompts in `evaluate`, in the tokenizer's chat template when "
        "it has one"))
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
        "merge a layer at a time and compare the merged model's answers on the probes with each "
        "constituent's; auto: when the streamed pass's estimated peak memory fits"))
    rehearse_max_gb: float | None = Field(default=None, gt=0, description=(
        "memory the streamed rehearsal may use under auto, in GB (default: what the device has "
        "free: the GPU's free memory, or the machine's available memory on CPU)"))
    answer_tokens: int = Field(default=32, ge=1, le=512, description=(
        "longest greedy answer the rehearsal compares, in tokens"))
    plan: PlanSpace | None = Field(default=None, description=(
        "the search space of `mergekit-collapse plan` (ignored by check and merge)"))
    planned: PlanSummary | None = Field(default=None, description=(
        "written by `mergekit-collapse plan`: how this config was chosen (shown on the card)"))

    @field_validator("action")
    @classmethod
    def _known_action(cls, value: str) -> str:
        names = action_names()
        if value not in names:
            raise ValueError(f"unknown action {value!r}{did_you_mean(value, names)}; "
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
    merge: MergeConfiguration
    guard: GuardSettings
    models: list[ModelReference]  # the constituents, in YAML order, base excluded
    base: ModelReference | None  # the anchor p_0, or None (see `find_base`)
    base_source: str | None = None  # where the anchor came from, or why there is none

    @property
    def base_note(self) -> str | None:
        """A note when `guard.base` (the risk score's anchor) is not the config's `base_model`
        (mergekit merges from the latter): said, so the difference is never silent."""
        given = self.merge.base_model
        if self.guard.base is None or given is None or self.base is None or self.base == given:
            return None
        return (f"guard.base {self.base} is the risk score's anchor, not the config's base_model "
                f"{given} (mergekit merges from base_model)")

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


def _is_member_tag(x: Any) -> bool:
    """pydantic names the union member an error belongs to in its loc (`ProbeFile`, `list[str]`,
    `function-after[...]`): a type's name, never a bare `[` a user may write as a key."""
    return isinstance(x, str) and (x in _MODEL_NAMES
                                   or re.fullmatch(r"[\w-]+\[.*\]", x) is not None)


def _loc(error: dict) -> tuple:
    """An error's loc without the union-member tags; an unknown key (extra_forbidden, always last)
    is kept whatever it looks like."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "extra_forbidden" and loc:
        return (*(x for x in loc[:-1] if not _is_member_tag(x)), loc[-1])
    return tuple(x for x in loc if not _is_member_tag(x))


def _closest_member(errors: list[dict]) -> list[dict]:
    """The errors of the union member the input came closest to: not rejected outright (its loc
    ends at the member), fewest errors. Errors outside any union are kept as they are."""
    members: dict[tuple, list[dict]] = {}
    for e in errors:
        loc = tuple(e.get("loc", ()))
        # the last is the user's key
        search = loc[:-1] if e.get("type") == "extra_forbidden" else loc
        cut = next((i for i, x in enumerate(search) if _is_member_tag(x)), None)
        members.setdefault(loc[: cut + 1] if cut is not None else (), []).append(e)
    if len(members) <= 1 or () in members:
        return members.get((), errors)
    return min(members.values(), key=lambda es: (any(_is_member_tag(e["loc"][-1]) for e in es),
                                                 len(es)))


def _friendly(err: ValidationError, allowed: dict[tuple, list[str]]) -> str:
    """One line for the first pydantic error; unknown keys get a did-you-mean."""
    errors = _closest_member(err.errors())
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    loc = _loc(first)
    where = ".".join(str(x) for x in loc)
    if first.get("type") == "extra_forbidden" and loc:
        key = str(loc[-1])
        options = allowed.get(tuple(type(x).__name__ for x in loc[:-1]), []) or _all_fields()
        return f"unknown key {'guard.' + where!r}{did_you_mean(key, options)}"
    return f"invalid {'guard.' + where if loc else 'guard'}: {_one_line(str(first.get('msg')))}"


_MODEL_NAMES = {"GuardSettings", "TaskSpec", "Budget", "ProbeFile", "ProbeLmEval", "PlanSpace",
                "PlanSummary"}


def _all_fields() -> list[str]:
    names: set[str] = set()
    for m in (GuardSettings, TaskSpec, Budget, ProbeFile, ProbeLmEval, PlanSpace, PlanSummary):
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
    """Constituent models in the order the YAML lists them (mergekit's referenced_models() is a
    set).

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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently: a second `guard:` section would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may override keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {first}); keep one of them",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _AnyTensor(str):
    """A tensor name every parameter filter matches (mergekit tests `filter in tensor_name`)."""

    def __contains__(self, _: object) -> bool:
        return True


def _merge_groups(merge: Any) -> list[tuple[str, list[Any], Any, Any]]:
    """(label, inputs, base, ConfigReader) per group of tensors mergekit merges together, normalised
    as mergekit's `MergePlanner.normalize_config` does, without reading any model's config."""
    from mergekit.config import (
        ConfigReader,
        InputSliceDefinition,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )

    def from_models(models: list[Any]) -> OutputSliceDefinition:
        sources = [InputSliceDefinition(layer_range=(0, 1), model=m.model, parameters=m.parameters)
                   for m in models]
        if merge.base_model is not None and all(m.model != merge.base_model for m in models):
            sources.append(InputSliceDefinition(layer_range=(0, 1), model=merge.base_model))
        return OutputSliceDefinition(sources=sources)

    modules = dict(merge.modules or {})
    if merge.models:
        modules = {"": OutputModuleDefinition(models=merge.models)}
    elif merge.slices:
        modules = {"": OutputModuleDefinition(slices=merge.slices)}
    groups = []
    for name, module in modules.items():
        reader = ConfigReader(config=merge, t=0, module=module)
        slices = [from_models(module.models)] if module.models else module.slices or []
        for i, s in enumerate(slices):
            label = (f"{name}." if name else "") + ("models" if module.models else f"slices[{i}]")
            groups.append((label, [src.model for src in s.sources],
                           s.base_model or merge.base_model, reader.for_out_slice(s)))
    return groups


def check_merge_method(merge: Any, *, inputs: bool = True) -> None:
    """mergekit's own checks of the merge method, before any model is loaded: the method exists,
    each group of inputs meets its contract (base model, input count, no duplicates), and every
    parameter it requires is given, with a valid value (`mergekit.parameter_resolver`).

    Args:
        merge: the parsed MergeConfiguration.
        inputs: check the input contract (not for the `order` action: it merges pairwise stages).

    Raises:
        ConfigError: what mergekit would raise once the models are loaded, as one line.
    """
    import mergekit.merge_methods as methods
    from mergekit.parameter_resolver import resolve_parameters

    try:
        method = methods.get(merge.merge_method)
    except RuntimeError:
        names = sorted(m.spec.name for m in methods.registered_methods())
        hint = did_you_mean(merge.merge_method, names) or f"; mergekit has {', '.join(names)}"
        raise ConfigError(f"unknown merge_method '{merge.merge_method}'{hint}") from None
    for label, refs, base, reader in _merge_groups(merge):
        try:
            if inputs:
                method.validate_inputs(refs, base, group_name=label)
            resolve_parameters(method.spec, tensor_name=_AnyTensor("*"),
                               inputs={m: _AnyTensor("*") for m in refs},
                               sources=reader.parameter_sources, base_model=base)
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(f"{merge.merge_method} ({label}): parameter value "
                              f"{err.get('input')!r} is not valid: {err['msg']}") from None
        except (ValueError, RuntimeError, TypeError) as e:
            msg = str(e).splitlines()[0].removesuffix(".*").removesuffix(" for *")
            if msg.startswith("Missing required parameter"):
                msg += "; set it under that model's `parameters:` or the top-level `parameters:`"
            raise ConfigError(f"{merge.merge_method}: {msg}") from None


def parse_config(source: str, path: Path | None = None) -> LoadedConfig:
    """Parse YAML text into a LoadedConfig.

    Args:
        source: the YAML text (a mergekit config, optionally with a `guard:` section).
        path: the file it came from; relative probe paths resolve against its folder.

    Returns:
        The parsed config.

    Raises:
        ConfigError: malformed YAML (a key given twice included), an invalid mergekit config (its
            schema, and its merge method's input and parameter contract: `check_merge_method`),
            or an invalid guard section.
    """
    from mergekit.config import MergeConfiguration

    where = f"{path}: " if path else ""
    try:
        raw = yaml.load(source, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
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
    try:
        check_merge_method(merge, inputs=guard.action != "order")
    except ConfigError as e:
        raise ConfigError(f"{where}invalid mergekit config: {e}") from None
    models = ordered_models(merge)
    for ref in [*models, merge.base_model]:  # before any file system call on them
        for part in ([] if ref is None else [ref.model] + ([ref.lora] if ref.lora else [])):
            check_path(part.path, f"{where}model")
    base, base_source = find_base(merge, guard, models)
    cfg = LoadedConfig(path=path, source=source, merge=merge, guard=guard, models=models,
                       base=base, base_source=base_source)
    if note := cfg.base_note:
        logger.warning("%s%s", where, note)
    known = {str(m) for m in models}
    for key in guard.tasks:
        if (ref := parse_ref(key)) is None:
            raise ConfigError(f"{where}guard.tasks key {key!r} is not a model reference")
        if ref not in models:
            raise ConfigError(f"{where}guard.tasks names {key!r}, which is not a model of this "
                              f"merge{did_you_mean(key, sorted(known))}")
    return cfg


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file's content, or a one-line BadInputError naming `what` it was.

    Raises:
        ModelNotFoundError: the file is missing (a FileNotFoundError too).
        BadInputError: unreadable or not UTF-8, or a path no file system holds (`_io.check_path`).
    """
    check_path(path, what)
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelNotFoundError(f"{what} file not found: {p}") from None
    except UnicodeDecodeError as e:
        raise BadInputError(f"{what} {p} is not UTF-8 text (byte {e.start}): "
                            "save it as UTF-8") from None
    except OSError as e:
        raise BadInputError(f"cannot read {what} {p}: {e}") from None


def check_writable(path: str | Path, what: str) -> None:
    """Refuse an output folder that cannot be created or written, before any work is done.

    Raises:
        BadInputError: `path` is a file, or its nearest existing parent is a file or not writable.
    """
    check_path(path, what)
    p = Path(path).expanduser().absolute()
    if p.is_file():
        raise BadInputError(f"{what} {p} is a file, not a folder: give a folder")
    parent = next(a for a in (p, *p.parents) if a.exists())
    if not parent.is_dir():
        raise BadInputError(f"cannot write {what} {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write {what} {p}: {parent} is not writable")


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
    new = replace(cfg, guard=guard, base=base, base_source=source)
    if (note := new.base_note) and note != cfg.base_note:
        logger.warning("%s", note)
    return new
