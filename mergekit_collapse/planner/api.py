"""`plan()`: from a pool of fine-tunes to the mergekit config predicted to keep the most, without
labels; writes plan.yml (the chosen config, with `guard.planned`), plan.json and plan.md."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from mergekit_collapse._io import atomic_write_text
from mergekit_collapse._version import __version__
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.config import PlanObjective, PlanSummary, check_writable, parse_config
from mergekit_collapse.planner.search import (
    Judged,
    check_floor,
    own_candidate,
    search,
    valued,
)
from mergekit_collapse.planner.space import (
    Candidate,
    Pool,
    candidate_raw,
    candidates,
    check_space,
    load_pool,
    sub_pool,
)
from mergekit_collapse.runtime import Runtime

if TYPE_CHECKING:
    from mergekit_collapse.guard.report import GuardReport


class Finalist(BaseModel):
    """One ranked candidate and its evidence."""

    rank: int
    origin: str
    method: str
    models: list[str]
    tasks: list[str]
    weights: list[float] | None
    ramp: list[float] | None = Field(default=None, description=(
        "per-layer factors of the weights (mergekit's gradient: weight × each factor)"))
    density: float | None
    relative_distortion: dict[str, float] = Field(description="the geometry screen, by task")
    proxy: dict[str, float] = Field(description="the screen's retention proxy, by task")
    rehearsal: dict[str, float] | None = Field(description=(
        "the calibrated rehearsal score by task (None: not rehearsed)"))
    token_agreement: dict[str, float] | None = None
    agreement: dict[str, float] | None = Field(default=None, description=(
        "rehearsal agreement by task (the share of probes answered as the constituent does)"))
    expected_retention: dict[str, float] = Field(description=(
        "by task: at its rehearsal agreement (search.RETENTION_AT_LEVEL), else the screen's proxy"))
    objective: float
    confirmed: bool = Field(default=False, description=(
        "rehearsed on a second sample of k probes per task too: its evidence is over both"))
    rehearsal_seconds: float
    observed: dict[str, float] | None = Field(default=None,
                                              description="--verify: lm-eval retention by task")
    verify_seconds: dict[str, float] = Field(default_factory=dict)


class FurtherMerge(BaseModel):
    """A further merge of a partition (`guard.plan.max_merges` > 1), written as plan-<n>.yml."""

    file: str
    summary: PlanSummary
    finalist: Finalist


class PlanResult(BaseModel):
    """plan.json: the search, its cost and the ranked finalists."""

    tool_version: str = __version__
    pool: str
    tasks: list[str]
    objective: PlanObjective
    floor: float
    methods: list[str]
    rejected_methods: dict[str, str]
    screened: int
    rehearsed: int
    seconds: dict[str, float]
    labelled_search_seconds: float | None = Field(description=(
        "what merging and lm-evaluating the rehearsed candidates would have cost (measured per "
        "merge with --verify; else the merges alone, a lower bound)"))
    labelled_search_basis: str
    kept_apart: list[str] = Field(description="tasks in none of the plan's merges")
    summary: PlanSummary
    finalists: list[Finalist]
    further: list[FurtherMerge] = Field(default_factory=list, description=(
        "the partition's other merges, in the order they were planned"))


def _finalist(pool: Pool, rank: int, j: Judged) -> Finalist:
    c = j.candidate
    return Finalist(rank=rank, origin=c.origin, method=c.method,
                    models=[pool.refs[i] for i in c.members],
                    tasks=[pool.tasks[i] for i in c.members],
                    weights=list(c.weights) if c.weights is not None else None,
                    ramp=list(c.ramp) if c.ramp else None, density=c.density,
                    relative_distortion=j.screen.relative_distortion, proxy=j.screen.proxy,
                    rehearsal=j.rehearsal, token_agreement=j.token_agreement,
                    agreement=j.agreement,
                    expected_retention={t: round(v, 3) for t, v in j.predicted.items()},
                    objective=j.value, confirmed=j.confirmed,
                    rehearsal_seconds=round(j.seconds, 2), observed=j.observed,
                    verify_seconds=j.verify_seconds)


def _why(pool: Pool, best: Judged, ranked: list[Judged], rule: str, floor: float) -> str:
    def kept_mean(j: Judged) -> tuple[int, float, float]:
        score = j.rehearsal if j.rehearsal is not None else j.screen.proxy
        vals = [j.predicted.get(t, 0.0) for t in pool.tasks]
        return (sum(score.get(t, 0.0) > floor for t in pool.tasks), sum(vals) / len(vals),
                min(vals))

    kept, mean, worst = kept_mean(best)
    source = "rehearsal" if best.rehearsal is not None else "geometry proxy"
    text = (f"best {rule} of {sum(j.rehearsal is not None for j in ranked) or len(ranked)} judged "
            f"({source}): keeps {kept}/{len(pool.tasks)} tasks above {floor:g}, expected retention "
            f"mean {mean:.2f}, worst {worst:.2f}")
    if best.confirmed:
        others = sum(j.confirmed for j in ranked) - 1
        text += (f" (confirmed: ranked over a second sample of probes too, with the {others} "
                 "next best)")
    uniform = next((j for j in ranked if j.rehearsal is not None and
                    len(j.candidate.members) == len(pool.tasks) and j is not best), None)
    if uniform is not None:
        kept, mean, _ = kept_mean(uniform)
        text += (f"; the best all-in merge ({uniform.candidate.method}) keeps {kept}, "
                 f"mean {mean:.2f}")
    return text


def _space(pool: Pool, methods: list[str], n_subsets: int) -> str:
    sp = pool.space
    must = f", must include {', '.join(sp.must_include)}" if sp.must_include else ""
    return (f"{n_subsets} subsets of {len(pool.refs)} models (≥ {sp.min_models}{must}) × "
            f"{len(methods)} methods ({', '.join(methods)}) × weights {sp.weights}"
            + (f" (flat and ramped {sp.ramps})" if sp.ramps else "")
            + f" × densities {sp.densities}")


def plan(pool: str | Path, *, out: str | Path | None = None, objective: PlanObjective | None = None,
         floor: float | None = None, max_rehearsals: int | None = None, refine: int | None = None,
         max_seconds: float | None = None, confirm: int | None = None,
         methods: list[str] | None = None, verify: int = 0, verify_limit: int | None = 24,
         runtime: Runtime | None = None) -> PlanResult:
    """Find the mergekit config of a pool predicted to keep the most of its tasks, without labels.

    Args:
        pool: a guard-style mergekit YAML: its models are the candidates, `guard.tasks` their
            probes, `guard.plan` the search space (`PlanSpace`); its own method and weights, if
            any, are one candidate.
        out: where to write plan.yml, plan.json and plan.md (None: write nothing).
        objective, floor, max_rehearsals, refine, confirm, methods: override `guard.plan`'s;
            max_seconds overrides `guard.plan.seconds` (the time budget).
        verify: merge and lm-eval the top `verify` finalists (needs each task's `eval`).
        verify_limit: lm-eval documents per task for `verify`.
        runtime: device, dtype, cache, progress (as for `check`).

    Returns:
        The PlanResult (finalists best first; `summary` is what plan.yml's `guard.planned` carries).

    Raises:
        ConfigError: invalid pool or search space (unknown method, must-include not in the pool).
        BadInputError: an empty search space, missing models, a floor out of [0, 1].
    """
    from mergekit_collapse.guard.assess import extraction_settings, run_guard

    t0 = time.perf_counter()
    p = load_pool(pool)
    _override_space(p, objective, floor, max_rehearsals, refine, max_seconds, confirm)
    if out is not None:
        check_writable(out, "plan folder")
    names = check_space(p, methods)
    rule, floor_ = p.space.objective, check_floor(p.space.floor)
    cands, rejected, own = _candidates(p, names)
    rt = runtime or Runtime()
    deadline = t0 + (p.space.seconds if p.space.seconds is not None else float("inf"))
    run = run_guard(p.cfg, runtime=rt,
                    rehearse="off" if own is None or p.space.rehearsals == 0 else "on")
    settings = extraction_settings(p.cfg, rt)
    seconds = {"hidden states": round(time.perf_counter() - t0, 2)}
    ranked, stage = search(p, run, cands, rule=rule, floor=floor_, rehearsals=p.space.rehearsals,
                           refine_trials=p.space.refine, confirm_top=p.space.confirm, own=own,
                           settings=settings,
                           cache_dir=rt.cache_dir, progress=rt.progress, deadline=deadline)
    seconds |= {k: round(v, 2) for k, v in stage.items()}
    _add_own_rehearsal(seconds, own, run.report)
    rehearsed = [j for j in ranked if j.rehearsal is not None]
    finalists = rehearsed or ranked[:10]
    if verify:
        _verify(p, finalists[:verify], Path(out) if out else None, verify_limit, rt.dtype,
                rt.progress)
    further = _partition(p, run, names, ranked, len(rehearsed), floor_, settings, rt, deadline)
    seconds["total"] = round(time.perf_counter() - t0, 2)
    summary = _summary(p, names, cands, own, ranked, rule, floor_, len(rehearsed),
                       seconds["total"])
    result = _plan_result(str(pool), p, names, rejected, seconds, summary, finalists,
                          finalists[:verify] if verify else rehearsed, [f for *_, f in further])
    if out is not None:
        write_plan(result, p, ranked[0], Path(out), [(sub, j) for sub, j, _ in further])
    return result


def _partition(p: Pool, run: Any, names: list[str], ranked: list[Judged], rehearsed: int,
               floor: float, settings: Any, rt: Runtime,
               deadline: float) -> list[tuple[Pool, Judged, FurtherMerge]]:
    """Up to `max_merges` − 1 further merges, greedily: each searches the tasks the merges so
    far leave apart, with the rehearsals left (those already made on such candidates count), and
    is kept when it is predicted to keep two of its tasks or more above the floor (a merge that
    keeps fewer saves no model to serve)."""
    sp, out = p.space, []
    left = max(sp.rehearsals - rehearsed, 0)
    apart = tuple(i for i in range(len(p.tasks)) if i not in ranked[0].candidate.members)
    while len(out) + 1 < sp.max_merges and len(apart) >= max(2, sp.min_models):
        sub = sub_pool(p, apart)
        cands, _ = candidates(sub, names)
        if not cands:
            break
        found, _ = search(sub, run, cands, rule=sp.objective, floor=floor, rehearsals=left,
                          refine_trials=min(sp.refine, left), confirm_top=sp.confirm,
                          own=None, settings=settings,
                          cache_dir=rt.cache_dir, progress=rt.progress, deadline=deadline)
        left = max(left - sum(j.rehearsal is not None for j in found), 0)
        judged = [j for j in [*_carried(p, sub, ranked, floor), *found] if j.rehearsal is not None]
        nxt = max(judged, key=lambda j: j.value) if judged else found[0]
        score = nxt.rehearsal if nxt.rehearsal is not None else nxt.screen.proxy
        if sum(v > floor for v in score.values()) < 2:
            break
        summary = _summary(sub, names, cands, None, [nxt, *found], sp.objective, floor,
                           len(judged), 0.0)
        out.append((sub, nxt, FurtherMerge(file=f"plan-{len(out) + 2}.yml", summary=summary,
                                           finalist=_finalist(sub, 1, nxt))))
        apart = tuple(i for i in apart if p.refs[i] not in
                      {sub.refs[k] for k in nxt.candidate.members})
    return out


def _carried(p: Pool, sub: Pool, ranked: list[Judged], floor: float) -> list[Judged]:
    """The rehearsals of `p`'s search whose candidates lie inside `sub`: re-indexed on `sub` and
    re-scored on its tasks."""
    out = []
    for j in ranked:
        refs = [p.refs[i] for i in j.candidate.members]
        if j.rehearsal is None or not set(refs) <= set(sub.refs):
            continue
        c = replace(j.candidate, members=tuple(sub.refs.index(r) for r in refs))
        out.append(valued(replace(j, candidate=c), sub.tasks, sub.space.objective, floor))
    return out


def _override_space(p: Pool, objective: PlanObjective | None, floor: float | None,
                    max_rehearsals: int | None, refine: int | None,
                    seconds: float | None = None, confirm: int | None = None) -> None:
    """Apply the options that override `guard.plan` to the pool's search space."""
    if max_rehearsals is not None and refine is None:  # a smaller budget shrinks the refinement
        refine = min(p.space.refine, max_rehearsals)
    update = {k: v for k, v in {"objective": objective, "floor": floor,
                                "rehearsals": max_rehearsals, "refine": refine,
                                "seconds": seconds, "confirm": confirm}.items()
              if v is not None}
    if update:
        try:
            p.space = p.space.model_validate({**p.space.model_dump(), **update})
        except ValidationError as e:
            err = e.errors()[0]
            raise BadInputError(f"invalid plan option {err['loc'][0]}={err.get('input')!r}: "
                                f"{err['msg']}") from None


def _candidates(p: Pool,
                names: list[str]) -> tuple[list[Candidate], dict[str, str], Candidate | None]:
    """(the candidate merges, the methods mergekit rejected and why, the pool's own config).

    Raises:
        BadInputError: no candidate at all.
    """
    cands, rejected = candidates(p, names)
    own = own_candidate(p)
    if not cands and own is None:
        why = "; ".join(f"{m}: {w}" for m, w in rejected.items())
        raise BadInputError("no candidate merge: mergekit accepts none of the methods for this "
                            f"pool ({why})")
    return cands, rejected, own


def _add_own_rehearsal(seconds: dict[str, float], own: Candidate | None,
                       report: GuardReport) -> None:
    """The guard rehearsed the pool's own config: count its seconds in the rehearse stage."""
    if own is not None and report.rehearsal is not None and report.rehearsal.status == "ran":
        seconds["rehearse"] = round(seconds.get("rehearse", 0) + sum(
            v for k, v in report.run_info.seconds.items() if k.startswith("rehearsal.")), 2)


def _summary(p: Pool, names: list[str], cands: list[Candidate], own: Candidate | None,
             ranked: list[Judged], rule: PlanObjective, floor: float, rehearsed: int,
             seconds: float) -> PlanSummary:
    """`guard.planned`: the search space, what was screened and rehearsed, why the best won."""
    best = ranked[0]
    subsets = len({c.members for c in cands})
    screened = len({c.key() for c in cands} | ({own.key()} if own is not None else set()))
    return PlanSummary(objective=rule, floor=floor, space=_space(p, names, subsets),
                       screened=screened, rehearsed=rehearsed,
                       why=_why(p, best, ranked, rule, floor),
                       predicted={t: round(v, 3) for t, v in best.predicted.items()},
                       kept_apart=[t for i, t in enumerate(p.tasks)
                                   if i not in best.candidate.members],
                       seconds=seconds)


def _plan_result(pool: str, p: Pool, names: list[str], rejected: dict[str, str],
                 seconds: dict[str, float], summary: PlanSummary, finalists: list[Judged],
                 measured: list[Judged], further: list[FurtherMerge]) -> PlanResult:
    """plan.json: the search, what a labelled search would have cost, the ranked finalists and
    the partition's further merges (named in the summary too)."""
    cost, basis = _labelled_cost(measured, summary.rehearsed or summary.screened)
    summary.other_merges = [f"{f.file}: {f.finalist.method} of {', '.join(f.finalist.tasks)}"
                            for f in further]
    merged = ({p.tasks[i] for i in finalists[0].candidate.members}
              | {t for f in further for t in f.finalist.tasks})
    return PlanResult(pool=pool, tasks=p.tasks, objective=summary.objective, floor=summary.floor,
                      methods=names, rejected_methods=rejected, screened=summary.screened,
                      rehearsed=summary.rehearsed, seconds=seconds, labelled_search_seconds=cost,
                      labelled_search_basis=basis, summary=summary, further=further,
                      kept_apart=[t for t in p.tasks if t not in merged],
                      finalists=[_finalist(p, i + 1, j) for i, j in enumerate(finalists)])


def _labelled_cost(measured: list[Judged], n: int) -> tuple[float | None, str]:
    """n × the measured merge + lm-eval seconds of one candidate (else the merges alone)."""
    full = [sum(j.verify_seconds.values()) for j in measured if j.verify_seconds]
    if full:
        per = sum(full) / len(full)
        return round(n * per, 1), (f"{n} candidates × {per:.1f} s "
                                   "(merge + lm-eval, measured by --verify)")
    merges = [j.seconds for j in measured if j.rehearsal is not None]
    if not merges:
        return None, "nothing rehearsed"
    per = sum(merges) / len(merges)
    return round(n * per, 1), (f"{n} candidates × {per:.1f} s (the in-memory merge alone; "
                               "lm-eval not measured: a lower bound, --verify measures it)")


def chosen_config(pool: Pool, best: Judged, summary: PlanSummary) -> dict[str, Any]:
    """plan.yml's mapping: the winner's mergekit config with `guard.planned`."""
    raw = candidate_raw(pool, best.candidate)
    raw["guard"]["planned"] = summary.model_dump(mode="json")
    return raw


def write_plan(result: PlanResult, pool: Pool, best: Judged, out: Path,
               further: list[tuple[Pool, Judged]] = ()) -> dict[str, Path]:
    """Write plan.yml (validated by our parser, i.e. mergekit's own schema and method rules),
    plan-2.yml, ... (the partition's further merges), plan.json and plan.md into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    configs = {"plan.yml": chosen_config(pool, best, result.summary)}
    for (sub, j), f in zip(further, result.further, strict=True):
        configs[f.file] = chosen_config(sub, j, f.summary)
    texts = {name: yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
             for name, raw in configs.items()}
    for name, text in texts.items():
        parse_config(text, (out / name).resolve())  # what mergekit-yaml --guard will read
    paths = {"yml": out / "plan.yml", "json": out / "plan.json", "md": out / "plan.md"}
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    atomic_write_text(paths["json"], result.model_dump_json(indent=2) + "\n")
    atomic_write_text(paths["md"], markdown(result))
    return paths


def _cell(d: dict[str, float] | None, tasks: list[str]) -> str:
    if d is None:
        return "—"
    return " ".join(f"{t} {d[t]:.2f}" for t in tasks if t in d)


def markdown(result: PlanResult) -> str:
    """plan.md: the summary, the cost and the ranked finalists with their evidence."""
    s = result.summary
    lines = [f"# Merge plan for `{Path(result.pool).name}`", "",
             f"**Chosen**: {result.finalists[0].method} of {', '.join(result.finalists[0].tasks)}"
             + "".join(f"; then {f.finalist.method} of {', '.join(f.finalist.tasks)} ({f.file})"
                       for f in result.further)
             + (f"; keep apart: {', '.join(result.kept_apart)}" if result.kept_apart else ""), "",
             f"- objective: {s.objective} (floor {s.floor:g}); {s.why}",
             f"- search space: {s.space}",
             f"- screened {s.screened} candidates with the geometry, rehearsed {s.rehearsed}"
             + (f", confirmed {n} on a second sample of probes"
                if (n := sum(f.confirmed for f in result.finalists)) else ""),
             "- cost: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()),
             "- a merge-and-evaluate search over the same candidates: "
             + (f"{result.labelled_search_seconds:.0f} s ({result.labelled_search_basis})"
                if result.labelled_search_seconds is not None else result.labelled_search_basis)]
    if result.rejected_methods:
        lines.append("- not valid for this pool (mergekit's rules): " + "; ".join(
            f"{m}: {w}" for m, w in result.rejected_methods.items()))
    lines += ["", "| rank | origin | method | tasks | weights | density | relative distortion | "
              "rehearsal score | expected retention | observed | objective |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in result.finalists:
        w = "/".join(f"{x:g}" for x in f.weights) if f.weights else "—"
        w += f" × ramp {'→'.join(f'{x:g}' for x in f.ramp)}" if f.ramp else ""
        origin = f.origin + (" (confirmed)" if f.confirmed else "")
        lines.append(f"| {f.rank} | {origin} | {f.method} | {', '.join(f.tasks)} | {w} | "
                     f"{'—' if f.density is None else f'{f.density:g}'} | "
                     f"{_cell(f.relative_distortion, f.tasks)} | {_cell(f.rehearsal, f.tasks)} | "
                     f"{_cell(f.expected_retention, f.tasks)} | "
                     f"{_cell(f.observed, f.tasks)} | {f.objective:.3f} |")
    return "\n".join(lines) + "\n"


def _verify(pool: Pool, top: list[Judged], out: Path | None, limit: int | None, dtype: str,
            progress: bool) -> None:
    """Merge each of `top` with mergekit and lm-eval it:
    observed retention (merged / constituent)."""
    import tempfile

    from mergekit.options import MergeOptions

    from mergekit_collapse._console import Progress
    from mergekit_collapse._constants import cache_root
    from mergekit_collapse.evaluate.observed import evaluate_merge
    from mergekit_collapse.merge import merge_config

    root = out / "verify" if out is not None else Path(tempfile.mkdtemp(prefix="plan-verify-"))
    bar = Progress("verify", len(top), enabled=progress)
    for i, j in enumerate(top, 1):
        raw = candidate_raw(pool, j.candidate)
        folder = root / f"rank{i}"
        text = yaml.safe_dump(raw, sort_keys=False)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / f"rank{i}.yml", text)
        t0 = time.perf_counter()
        # a scratch merge for lm-eval: no card (mergekit's asks the Hub about relative paths)
        merge_config(raw, folder, MergeOptions(lora_merge_cache=str(cache_root() / "lora_merged"),
                                               copy_tokenizer=True, quiet=True, lazy_unpickle=False,
                                               random_seed=pool.cfg.guard.seed,
                                               write_model_card=False))
        t1 = time.perf_counter()
        ev = evaluate_merge(folder, parse_config(text, (root / f"rank{i}.yml").resolve()),
                            limit=limit, progress=False,
                            dtype="float32" if dtype == "auto" else dtype)
        t2 = time.perf_counter()
        if any(t.constituent is None for t in ev.tasks):
            raise BadInputError(f"verify: rank {i} has tasks without a score")
        j.observed = {t.task: (t.merged / t.constituent if t.constituent else 0.0)
                      for t in ev.tasks}
        j.verify_seconds = {"merge": round(t1 - t0, 2), "evaluate": round(t2 - t1, 2)}
        bar.done(f"rank {i}", seconds=t2 - t0)
    bar.close()
