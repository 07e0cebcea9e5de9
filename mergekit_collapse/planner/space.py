"""The planner's search space: the pool (a guard-style mergekit YAML), its candidates (subset ×
method × weight × density) as mergekit configs, checked with mergekit's own rules, and the
geometry screen that ranks them in milliseconds once the hidden states are cached."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mergekit_collapse.errors import BadInputError, ConfigError
from mergekit_collapse.guard import geometry
from mergekit_collapse.guard.config import (
    LoadedConfig,
    PlanSpace,
    check_merge_method,
    did_you_mean,
    parse_config,
    read_text,
)
from mergekit_collapse.guard.weights import planned_weights

#: the methods tried when `guard.plan.methods` is not given (each where mergekit accepts the subset)
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs",
                   "model_stock", "sce", "karcher")
#: enumerate every subset up to this many; beyond, only the pool less up to `MAX_LEFT_OUT` models
MAX_SUBSETS = 5000
MAX_LEFT_OUT = 3
#: keys of the pool's YAML a candidate replaces (the rest, dtype or tokenizer_source, it keeps)
_REPLACED = ("models", "slices", "modules", "merge_method", "parameters", "base_model", "guard")


#: per-layer factors of every weight: written as mergekit's gradient (weight × each factor)
Ramp = tuple[float, ...]


@dataclass(frozen=True)
class Candidate:
    """One mergekit config to judge: pool members (indices), method, per-member weights, density."""

    members: tuple[int, ...]
    method: str
    weights: tuple[float, ...] | None  # per member; None: the method takes no `weight`
    density: float | None = None
    origin: str = "grid"  # grid | as written | refine
    globals: tuple[tuple[str, Any], ...] = ()  # top-level `parameters:` (the config as written)
    ramp: Ramp | None = None

    def key(self) -> tuple:
        w = tuple(round(x, 4) for x in self.weights) if self.weights is not None else None
        return (self.members, self.method, w,
                None if self.density is None else round(self.density, 4), self.globals,
                self.ramp)

    def weight(self, j: int) -> float | list[float]:
        """Member j's `weight` as mergekit reads it: a number, or a gradient over the layers."""
        w = float(self.weights[j]) if self.weights is not None else 1.0
        return [round(w * f, 6) for f in self.ramp] if self.ramp else w


@dataclass
class Pool:
    """The candidates' pool: the parsed config, each model's reference as written and its task."""

    cfg: LoadedConfig
    refs: list[str]  # as written under models: (the guard.tasks keys)
    tasks: list[str]
    base: str
    space: PlanSpace
    own: bool  # the YAML named a merge_method: its own config is a candidate
    extra: dict[str, Any] = field(default_factory=dict)  # the pool's other mergekit keys (dtype...)

    def index(self, ref: str, what: str) -> int:
        """The pool index of a reference as written (or as mergekit parses it)."""
        from mergekit_collapse.guard.config import parse_ref

        parsed = parse_ref(ref)
        for i, m in enumerate(self.cfg.models):
            if ref == self.refs[i] or (parsed is not None and parsed == m):
                return i
        raise ConfigError(f"{what} names {ref!r}, which is not a model of the pool"
                          f"{did_you_mean(ref, self.refs)}")


def load_pool(path: str | Path) -> Pool:
    """Read a pool: a guard-style mergekit YAML whose `models:` are the candidates.

    Without a `merge_method` the YAML is read as a uniform linear merge (not itself a candidate).

    Raises:
        ConfigError: invalid YAML, mergekit config or guard section; no base; unknown methods.
        ModelNotFoundError: the file is missing.
    """
    text = read_text(path, "pool")
    raw = yaml.safe_load(text)
    own = isinstance(raw, dict) and "merge_method" in raw
    if isinstance(raw, dict) and not own:
        raw = {"merge_method": "linear", **raw, "parameters": {**(raw.get("parameters") or {}),
                                                                "weight": 1.0}}
        guard = raw.setdefault("guard", {}) or {}
        raw["guard"] = guard
        if raw.get("base_model") is not None:  # linear would weigh it in: the guard's anchor only
            guard.setdefault("base", raw.pop("base_model"))
        text = yaml.safe_dump(raw, sort_keys=False)
    cfg = parse_config(text, Path(path).resolve())
    return pool_of(cfg, own=own, raw=raw)


def pool_of(cfg: LoadedConfig, *, own: bool = True, raw: dict | None = None) -> Pool:
    """The pool of a parsed config (see `load_pool`)."""
    where = f"{cfg.path}: " if cfg.path else ""
    if cfg.merge.models is None:
        raise ConfigError(f"{where}the pool lists its candidates under models: (not slices)")
    if len(cfg.models) < 2:
        raise ConfigError(f"{where}the pool has {len(cfg.models)} model(s): a plan merges "
                          "two or more")
    if cfg.base is None:
        raise ConfigError(f"{where}the pool needs the common base (base_model, or guard.base): "
                          f"{cfg.base_source}")
    if not cfg.guard.tasks:
        raise ConfigError(f"{where}the pool has no guard.tasks: each model needs a task "
                          "with probes")
    from mergekit_collapse.guard.config import parse_ref

    refs, tasks = [], []
    for m in cfg.models:
        key = next((k for k in cfg.guard.tasks if parse_ref(k) == m), None)
        if key is None:
            raise ConfigError(f"{where}guard.tasks has no entry for model '{m}'")
        refs.append(key)
        tasks.append(cfg.guard.tasks[key].name)
    raw = raw if raw is not None else yaml.safe_load(cfg.source)
    extra = {k: v for k, v in raw.items() if k not in _REPLACED}
    pool = Pool(cfg=cfg, refs=refs, tasks=tasks, base=str(cfg.base),
                space=cfg.guard.plan or PlanSpace(), own=own, extra=extra)
    try:
        for m in pool.space.must_include:
            pool.index(m, "guard.plan.must_include")
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    for name in pool.space.methods or ():
        try:
            known_method(name)
        except ConfigError as e:
            raise ConfigError(f"{where}guard.plan.methods: {e}") from None
    return pool


def known_method(name: str) -> Any:
    """mergekit's registered method `name`.

    Raises:
        ConfigError: mergekit has no such method (with a did-you-mean).
    """
    import mergekit.merge_methods as methods

    try:
        return methods.get(name)
    except RuntimeError:
        names = sorted(m.spec.name for m in methods.registered_methods())
        hint = did_you_mean(name, names) or f"; mergekit has {', '.join(names)}"
        raise ConfigError(f"unknown merge method '{name}'{hint}") from None


@cache
def method_parameters(name: str) -> frozenset[str]:
    """The parameter names mergekit's method `name` declares."""
    return frozenset(p.name for p in known_method(name).spec.parameters)


@cache
def sparsifies(name: str) -> bool:
    """Whether the method's `density` is used: mergekit's task-arithmetic methods that sparsify."""
    return getattr(known_method(name), "sparsification_method", None) is not None


@cache
def uses_base(name: str) -> bool:
    """Whether the method takes a base model (mergekit's contract: required or optional)."""
    return known_method(name).spec.contract.base.value != "ignored"


def sub_pool(pool: Pool, members: tuple[int, ...]) -> Pool:
    """The pool of some of `pool`'s models (a further merge of a partition): the same search
    space but for `must_include`, which binds the first merge only."""
    raw = candidate_raw(pool, Candidate(members, "linear", None, None))
    raw["guard"]["plan"] = pool.space.model_dump(mode="json") | {"must_include": []}
    cfg = parse_config(yaml.safe_dump(raw, sort_keys=False), pool.cfg.path)
    return pool_of(cfg, own=False, raw=raw)


def candidate_raw(pool: Pool, c: Candidate) -> dict[str, Any]:
    """The mergekit YAML mapping of a candidate, with its `guard:` section (tasks of its
    members)."""
    models = []
    params = method_parameters(c.method)
    for j, i in enumerate(c.members):
        p: dict[str, Any] = {}
        if "weight" in params:
            p["weight"] = c.weight(j)
        if sparsifies(c.method) and c.density is not None:
            p["density"] = float(c.density)
        models.append({"model": pool.refs[i], **({"parameters": p} if p else {})})
    raw: dict[str, Any] = {"merge_method": c.method}
    guard = pool.cfg.guard.model_dump(mode="json", exclude_defaults=True,
                                      exclude={"plan", "planned", "tasks", "base"})
    guard["tasks"] = {pool.refs[i]: _portable(pool, pool.refs[i]) for i in c.members}
    if uses_base(c.method):
        raw["base_model"] = pool.base
    else:
        guard["base"] = pool.base
    raw["models"] = models
    if c.globals:
        raw["parameters"] = dict(c.globals)
    raw.update(pool.extra)
    raw["guard"] = guard
    return raw


def _portable(pool: Pool, ref: str) -> dict[str, Any]:
    """A task's spec with its probe and eval files absolute (a candidate's YAML is written
    elsewhere than the pool; model paths stay as written: mergekit reads them from the cwd)."""
    spec = pool.cfg.guard.tasks[ref].model_dump(mode="json", exclude_defaults=True)
    probes = spec.get("probes")
    if isinstance(probes, dict) and probes.get("file"):
        probes["file"] = str(pool.cfg.resolve(probes["file"]))
    if isinstance(probes, dict) and probes.get("include_path"):
        probes["include_path"] = str(pool.cfg.resolve(probes["include_path"]))
    if str(spec.get("eval") or "").endswith((".yaml", ".yml")):
        spec["eval"] = str(pool.cfg.resolve(spec["eval"]))
    return spec


def merge_of(raw: dict[str, Any]) -> Any:
    """mergekit's MergeConfiguration of a candidate's YAML mapping (its guard: left out)."""
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate({k: v for k, v in raw.items() if k != "guard"})


_VALID: dict[tuple[str, int], str | None] = {}


def rejection(pool: Pool, c: Candidate) -> str | None:
    """None when mergekit's rules accept the candidate (registry, arity, base, parameters), else
    why not; cached per (method, size): the rules depend on nothing else here."""
    key = (c.method, len(c.members))
    if key not in _VALID:
        try:
            check_merge_method(merge_of(candidate_raw(pool, c)))
            _VALID[key] = None
        except (ConfigError, ValueError) as e:
            _VALID[key] = str(e)
    return _VALID[key]


def subsets(n: int, must: set[int], min_size: int) -> list[tuple[int, ...]]:
    """Every subset of range(n) holding `must` with at least `min_size` members, largest first;
    beyond `MAX_SUBSETS`, only the pool less up to `MAX_LEFT_OUT` models."""
    if 2 ** n <= MAX_SUBSETS:
        sizes = range(n, min_size - 1, -1)
    else:
        sizes = range(n, max(min_size, n - MAX_LEFT_OUT) - 1, -1)
    out = []
    for size in sizes:
        for s in itertools.combinations(range(n), size):
            if must <= set(s):
                out.append(s)
    return out


def candidates(pool: Pool, methods: list[str]) -> tuple[list[Candidate], dict[str, str]]:
    """The grid: subsets × methods × weights (flat, and each ramp where weights are not
    normalised) × densities, each accepted by mergekit's rules.

    Returns:
        (candidates, {method: why mergekit rejects it} for methods no subset may use).
    """
    sp = pool.space
    must = {pool.index(m, "guard.plan.must_include") for m in sp.must_include}
    out, rejected = [], {}
    subs = subsets(len(pool.refs), must, sp.min_models)
    for method in methods:
        params = method_parameters(method)
        weights = sorted(set(sp.weights)) if "weight" in params else [None]
        ramps: list[Ramp | None] = [None]
        if method == "linear" or ("normalize" in params and _default(method, "normalize")):
            weights = weights[-1:]  # normalised: a common weight (or ramp) changes nothing
        elif "weight" in params:
            ramps += list(dict.fromkeys(tuple(r) for r in sp.ramps))
        densities = sorted(set(sp.densities)) if sparsifies(method) else [None]
        used = False
        for s in subs:
            for w, d, r in itertools.product(weights, densities, ramps):
                c = Candidate(s, method, None if w is None else (w,) * len(s), d, ramp=r)
                why = rejection(pool, c)
                if why is None:
                    out.append(c)
                    used = True
                else:
                    rejected.setdefault(method, why)
        if used:
            rejected.pop(method, None)
    return out, rejected


def _default(method: str, name: str) -> Any:
    return next((p.default for p in known_method(method).spec.parameters if p.name == name), None)


@dataclass
class Screen:
    """The geometry of one candidate: each member's relative distortion and retention proxy."""

    relative_distortion: dict[str, float]  # by task
    proxy: dict[str, float]  # by task: 1 - rd / (2 · collapse edge), clipped to [0, 1]


class Geometry:
    """Squared distances of base + pool models, computed once; each screen is a few dot products.

    The proxy maps the calibrated relative-distortion collapse edge to retention 0.5, where the
    rehearsal's collapse edge lies, so screen and rehearsal rank on one scale.
    """

    def __init__(self, pool: Pool, vectors: dict[str, np.ndarray], edge: float):
        stack = np.stack([vectors[pool.base], *[vectors[str(m)] for m in pool.cfg.models]])
        self.sq = geometry.pairwise_distances(stack).sq
        self.pool, self.edge = pool, edge
        self._w: dict[tuple, np.ndarray] = {}

    def task_weights(self, c: Candidate) -> np.ndarray:
        """The candidate's task-space weights (`guard.weights.planned_weights`; uniform where the
        method has no linear weights)."""
        key = (c.method, len(c.members), c.weights, c.density, c.globals, c.ramp)
        if key not in self._w:
            raw = candidate_raw(self.pool, c)
            cfg = LoadedConfig(path=None, source="", merge=merge_of(raw), guard=self.pool.cfg.guard,
                               models=[self.pool.cfg.models[i] for i in c.members], base=None)
            w, _ = planned_weights(cfg)
            self._w[key] = w if w is not None else np.full(len(c.members), 1.0 / len(c.members))
        return self._w[key]

    def screen(self, c: Candidate) -> Screen:
        idx = [0, *[i + 1 for i in c.members]]
        rd = geometry.base_anchored(self.sq[np.ix_(idx, idx)],
                                    self.task_weights(c)).relative_distortion
        tasks = [self.pool.tasks[i] for i in c.members]
        proxy = np.clip(1 - rd / (2 * self.edge), 0.0, 1.0)
        return Screen(dict(zip(tasks, map(float, rd), strict=True)),
                      dict(zip(tasks, map(float, proxy), strict=True)))


def check_space(pool: Pool, methods: list[str] | None) -> list[str]:
    """The methods to try: those given (checked against mergekit's registry), else the defaults.

    Raises:
        ConfigError: an unknown method; BadInputError: a floor or budget that cannot work.
    """
    names = list(methods or pool.space.methods or DEFAULT_METHODS)
    for name in names:
        try:
            known_method(name)
        except ConfigError as e:
            raise ConfigError(f"--methods: {e}") from None
    sp = pool.space
    if sp.refine > sp.rehearsals:
        raise BadInputError(f"guard.plan.refine ({sp.refine}) exceeds the rehearsal budget "
                            f"({sp.rehearsals}): lower refine or raise --max-rehearsals")
    return list(dict.fromkeys(names))
