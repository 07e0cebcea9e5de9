"""The search, cheap to dear: the geometry screens every candidate, the rehearsal judges the most
promising ones (it decides), optuna's seeded TPE refines the best one's weights; each candidate is
scored by its per-task predicted retention under the user's rule."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_collapse._console import Progress
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.calibration import load_calibration
from mergekit_collapse.planner.space import (
    Candidate,
    Geometry,
    Pool,
    Ramp,
    Screen,
    candidate_raw,
    merge_of,
    method_parameters,
    rejection,
    sparsifies,
)

#: weight of the secondary score (token agreement) that breaks ties of the primary one
TIE_BREAK = 1e-3
#: mean observed retention (lm-eval, merged / constituent) at each rehearsal-agreement level, over
#: the validity run's 1,065 rehearsed constituents (benchmarks/results/rehearsal.jsonl joined with
#: records.jsonl; `benchmarks/planner.py --fit-retention`): agreement detects collapse, this maps it
#: to the retention a task keeps on average, so a partly kept task is not counted as lost
AGREEMENT_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
RETENTION_AT_LEVEL = (0.109, 0.412, 0.714, 0.818, 0.877, 0.963)


def expected_retention(agreement: dict[str, float]) -> dict[str, float]:
    """Each task's expected retention at its rehearsal agreement (`RETENTION_AT_LEVEL`)."""
    return {t: float(np.interp(a, AGREEMENT_LEVELS, RETENTION_AT_LEVEL))
            for t, a in agreement.items()}


@dataclass
class Judged:
    """A candidate with its evidence: geometry screen, then (if rehearsed) the rehearsal."""

    candidate: Candidate
    screen: Screen
    rehearsal: dict[str, float] | None = None  # by task: the calibrated rehearsal score
    token_agreement: dict[str, float] | None = None  # by task
    agreement: dict[str, float] | None = None  # by task: what RETENTION_AT_LEVEL is fitted on
    seconds: float = 0.0  # the rehearsal's merge + compare time
    value: float = float("-inf")  # the objective (rehearsal when rehearsed, else the screen)
    confirmed: bool = False  # rehearsed on the second probe sample too, its evidence pooled
    observed: dict[str, float] | None = None  # --verify: lm-eval retention by task
    verify_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def predicted(self) -> dict[str, float]:
        """Expected retention by task: from the rehearsal when rehearsed, else the screen's
        proxy."""
        return (expected_retention(self.agreement) if self.agreement is not None
                else self.screen.proxy)


def objective(per_task: dict[str, float], tasks: list[str], rule: str, floor: float,
              tie: dict[str, float] | None = None,
              retention: dict[str, float] | None = None) -> float:
    """One number to maximise: the rule over every pool task (a task left out counts 0).

    kept: tasks whose score (`per_task`) is above `floor`, then the mean retention (weighted below
    one task); mean: the mean retention, then the worst; worst: the worst, then the mean. Retention
    is `retention` (the rehearsal's expected retention) or else `per_task` itself. `tie` (the token
    agreement) breaks what remains tied.
    """
    score = np.array([per_task.get(t, 0.0) for t in tasks], dtype=float)
    ret = retention if retention is not None else per_task
    r = np.array([ret.get(t, 0.0) for t in tasks], dtype=float)
    mean, worst = float(r.mean()), float(r.min())
    value = {"kept": float((score > floor).sum()) + 0.5 * mean,
             "mean": mean + TIE_BREAK * worst,
             "worst": worst + TIE_BREAK * mean}[rule]
    if tie:
        value += TIE_BREAK * TIE_BREAK * float(np.mean([tie.get(t, 0.0) for t in tasks]))
    return value


def valued(j: Judged, tasks: list[str], rule: str, floor: float) -> Judged:
    """`j` with its value: the objective of its rehearsal over `tasks`."""
    return replace(j, value=objective(j.rehearsal or {}, tasks, rule, floor, j.token_agreement,
                                      j.predicted))


def pick_for_rehearsal(ranked: list[Judged], n: int, pool_size: int) -> list[Judged]:
    """`n` candidates from the screen's ranking: first the all-in merge of each method (the
    baselines a plan must beat; the screen's best of each, best first, at most n − 1 of them so
    that a subset is tried too), then alternately the best with a subset and the best with a
    method not picked yet (the geometry ranks subsets far better than methods)."""
    picked: list[Judged] = []
    keys: set[tuple] = set()
    all_in: dict[str, Judged] = {}
    for j in ranked:
        if len(j.candidate.members) == pool_size:
            all_in.setdefault(j.candidate.method, j)
    for j in list(all_in.values())[:max(n - 1, 1) if n > 0 else 0]:
        picked.append(j)
        keys.add(j.candidate.key())
    for turn in range(n - len(picked)):
        seen = {j.candidate.members for j in picked} if turn % 2 == 0 else \
            {j.candidate.method for j in picked}
        pick = next((j for j in ranked if j.candidate.key() not in keys and
                     (j.candidate.members if turn % 2 == 0 else j.candidate.method) not in seen),
                    None) or next((j for j in ranked if j.candidate.key() not in keys), None)
        if pick is None:
            break
        picked.append(pick)
        keys.add(pick.candidate.key())
    return picked


class Rehearser:
    """Rehearses candidates of one pool (each constituent's answers are cached after the first)."""

    def __init__(self, pool: Pool, geo: Geometry, probes: Any, settings: Any,
                 cache_dir: Path | None):
        from mergekit_collapse.guard.assess import probes_by_model

        self.pool, self.geo, self.settings, self.cache_dir = pool, geo, settings, cache_dir
        self.sample = probes
        self.probes = probes_by_model(pool.cfg, probes)
        cal = load_calibration()
        self.score = cal.rehearsal.score if cal.rehearsal else "rehearsal_agreement"
        self.count, self.seconds = 0, 0.0

    @cached_property
    def more(self) -> dict[str, list[str]]:
        """The second probe sample (`guard.probes.more_probes`) by model, read when first asked."""
        from mergekit_collapse.guard.assess import probes_by_model
        from mergekit_collapse.guard.probes import more_probes

        return probes_by_model(self.pool.cfg, more_probes(self.pool.cfg, self.sample))

    def __call__(self, c: Candidate) -> Judged:
        """`c` judged by its rehearsal (its value left to the caller)."""
        by, dt = self._rehearse(c, self.probes)
        return self._judged(c, by, dt)

    def confirmed(self, j: Judged) -> Judged:
        """`j` (rehearsed) rehearsed again on the second probe sample; its evidence pooled over
        both samples, each weighted by its probe count; its seconds the two rehearsals'."""
        from mergekit_collapse.guard.rehearsal import partial_credit

        more, dt = self._rehearse(j.candidate, self.more)
        first = {t: {"rehearsal_agreement": j.agreement[t], self.score: j.rehearsal[t],
                     "rehearsal_token_agreement": j.token_agreement[t]} for t in j.agreement}
        pooled = {}
        for i in j.candidate.members:
            task, ref = self.pool.tasks[i], str(self.pool.cfg.models[i])
            n, m = len(self.probes[ref]), len(self.more[ref])
            if m == 0:  # a task with no probe left: its first sample is all there is
                pooled[task] = first[task]
                continue
            x = {k: (v * n + more[task][k] * m) / (n + m) for k, v in first[task].items()}
            if self.score == "rehearsal_partial":  # not a mean: its token term is 1/(2 probes)
                x[self.score] = partial_credit(x["rehearsal_agreement"],
                                               x["rehearsal_token_agreement"], n + m)
            pooled[task] = x
        return replace(self._judged(j.candidate, pooled, j.seconds + dt), confirmed=True)

    def _rehearse(self, c: Candidate,
                  probes: dict[str, list[str]]) -> tuple[dict[str, dict[str, float]], float]:
        """The rehearsal's summaries by task on `probes` (of the members that have probes),
        and its seconds."""
        from mergekit_collapse.guard.rehearsal import rehearse

        g = self.pool.cfg.guard
        members = [i for i in c.members if probes[str(self.pool.cfg.models[i])]]
        models = [self.pool.cfg.models[i] for i in members]
        t0 = time.perf_counter()
        r = rehearse(merge_of(candidate_raw(self.pool, c)), models,
                     {str(m): probes[str(m)] for m in models}, self.settings,
                     answer_tokens=g.answer_tokens, seed=g.seed, cache_dir=self.cache_dir,
                     progress=False)
        dt = time.perf_counter() - t0
        self.count += 1
        self.seconds += dt
        return {self.pool.tasks[i]: r.models[str(m)]
                for i, m in zip(members, models, strict=True)}, dt

    def _judged(self, c: Candidate, by: dict[str, dict[str, float]], dt: float) -> Judged:
        return Judged(c, self.geo.screen(c), {t: x[self.score] for t, x in by.items()},
                      {t: x["rehearsal_token_agreement"] for t, x in by.items()},
                      {t: x["rehearsal_agreement"] for t, x in by.items()}, dt)


def confirm(done: list[Judged], judge: Callable[[Judged], Judged], n: int, *,
            progress: Progress, deadline: float = float("inf")) -> list[Judged]:
    """The best of each of the `n` best merges in `done` (best first; a merge is a subset and a
    method, so refined weights of one merge count once) rehearsed again on more probes and
    re-ranked on both samples, ahead of the rest: the winner is the best confirmed candidate.
    Nothing changes with fewer than two such merges (no choice to confirm)."""
    top: list[Judged] = []
    merges: set[tuple] = set()
    for j in done:
        merge = (j.candidate.members, j.candidate.method)
        if j.rehearsal is not None and merge not in merges and len(top) < n:
            top.append(j)
            merges.add(merge)
    if len(top) < 2:
        return done
    out = []
    for j in top:
        if time.perf_counter() > deadline:
            break
        label = f"confirm {_describe(j.candidate)}"
        progress.start(label)
        out.append(judge(j))
        progress.done(label, seconds=out[-1].seconds - j.seconds,
                      note=f"objective {j.value:.3f} → {out[-1].value:.3f}")
    ids = {id(j) for j in top[:len(out)]}
    rest = [j for j in done if id(j) not in ids]
    if len(out) < 2:  # the time budget cut it short: one sample's ranking is all there is
        return sorted(out + rest, key=lambda j: -j.value)
    return sorted(out, key=lambda j: -j.value) + rest


def refine(best: Judged, judge: Callable[[Candidate], Judged], trials: int, *, seed: int,
           weights: list[float], progress: Progress,
           deadline: float = float("inf")) -> list[Judged]:
    """optuna's seeded TPE over the best candidate's per-model weights (and density), `trials`
    rehearsals (none starts after `deadline`, a `time.perf_counter()` value); the best candidate
    is told to the study first, so TPE starts from it."""
    import optuna

    c = best.candidate
    params = method_parameters(c.method)
    lo, hi = min(weights) / 2, max(weights) * 1.5
    dist: dict[str, Any] = {}
    if "weight" in params and c.weights is not None:
        dist |= {f"w{j}": optuna.distributions.FloatDistribution(lo, hi)
                 for j in range(len(c.members))}
    if sparsifies(c.method) and c.density is not None:
        dist["density"] = optuna.distributions.FloatDistribution(0.1, 1.0)
    if not dist or trials <= 0:
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    start = {f"w{j}": min(max(w, lo), hi) for j, w in enumerate(c.weights or ())} | (
        {"density": c.density} if "density" in dist else {})
    study.add_trial(optuna.trial.create_trial(params={k: start[k] for k in dist},
                                              distributions=dist, value=best.value))
    out = []
    for _ in range(trials):
        if time.perf_counter() > deadline:
            break
        trial = study.ask(dist)
        cand = Candidate(c.members, c.method,
                         tuple(round(trial.params[f"w{j}"], 3) for j in range(len(c.members)))
                         if "w0" in dist else c.weights,
                         round(trial.params["density"], 3) if "density" in dist else c.density,
                         origin="refine", globals=c.globals, ramp=c.ramp)
        label = f"refine {_describe(cand)}"
        progress.start(label)
        j = judge(cand)
        study.tell(trial, j.value)
        progress.done(label, seconds=j.seconds, note=f"objective {j.value:.3f}")
        out.append(j)
    return out


def _describe(c: Candidate) -> str:
    w = "" if c.weights is None else " w " + "/".join(f"{x:g}" for x in c.weights)
    w += "" if c.ramp is None else " ramp " + "→".join(f"{x:g}" for x in c.ramp)
    d = "" if c.density is None else f" d {c.density:g}"
    return f"{c.method} [{','.join(map(str, c.members))}]{w}{d}"


def geometry(pool: Pool, run: Any) -> Geometry:
    """The screen of `pool` from the guard's run on it (its hidden states), against the calibrated
    collapse edge of the relative distortion."""
    cal = load_calibration()
    edge = cal.bands.collapse if cal.score == "relative_distortion" else 0.35
    return Geometry(pool, run.extraction.vectors, edge)


def search(pool: Pool, run: Any, cands: list[Candidate], *, rule: str, floor: float,
           rehearsals: int, refine_trials: int, confirm_top: int, own: Candidate | None,
           settings: Any, cache_dir: Path | None, progress: bool = True,
           deadline: float = float("inf")) -> tuple[list[Judged], dict[str, float]]:
    """Screen all, rehearse the best picks, refine the winner; no rehearsal starts after
    `deadline` (a `time.perf_counter()` value: the time budget).

    Args:
        pool: the pool. run: the guard's run on it (hidden states; its rehearsal of the config as
            written, when it ran). cands: the grid. own: the config as written, as a candidate.
        rule, floor: the objective. rehearsals: the budget, refinement included.
        refine_trials: rehearsals spent on refinement.
        confirm_top: the best of this many best merges rehearsed again on a second probe
            sample (`confirm`).

    Returns:
        (every judged candidate, best first; seconds by stage).
    """
    geo = geometry(pool, run)
    t0 = time.perf_counter()
    judged = _screen(geo, cands, pool.tasks, rule, floor)
    seconds = {"screen": time.perf_counter() - t0}
    bar = Progress("screen", 1, enabled=progress)
    bar.done(f"{len(judged)} candidates by the geometry", seconds=seconds["screen"])
    if rehearsals <= 0:
        return judged, seconds

    rehearser = Rehearser(pool, geo, run.probes, settings, cache_dir)

    def judge(c: Candidate) -> Judged:
        return valued(rehearser(c), pool.tasks, rule, floor)

    def judge_again(j: Judged) -> Judged:
        return valued(rehearser.confirmed(j), pool.tasks, rule, floor)

    done = _judge_own(own, run.report, rehearser.score, geo, pool.tasks, rule, floor)
    budget = max(rehearsals - refine_trials - len(done), 0)
    ranked = [j for j in judged if own is None or j.candidate.key() != own.key()]
    picks = pick_for_rehearsal(ranked, budget, len(pool.refs) if not done else 0)
    if confirm_top and not any(rehearser.more.values()):
        confirm_top = 0  # no probe left to confirm on
    total = len(picks) + (refine_trials + confirm_top if picks or done else 0)
    bar = Progress("rehearse", total, enabled=progress)
    t1 = time.perf_counter()
    for j in picks:
        if time.perf_counter() > deadline:
            break
        label = _describe(j.candidate)
        bar.start(label)
        done.append(judge(j.candidate))
        bar.done(label, seconds=done[-1].seconds, note=f"objective {done[-1].value:.3f}")
    done.sort(key=lambda j: -j.value)
    seconds["rehearse"] = time.perf_counter() - t1
    if done and refine_trials:
        t2 = time.perf_counter()
        done += refine(done[0], judge, refine_trials, seed=pool.cfg.guard.seed,
                       weights=pool.space.weights, progress=bar, deadline=deadline)
        seconds["refine"] = time.perf_counter() - t2
    done.sort(key=lambda j: -j.value)
    if confirm_top:
        t3 = time.perf_counter()
        done = confirm(done, judge_again, confirm_top, progress=bar, deadline=deadline)
        seconds["confirm"] = time.perf_counter() - t3
    bar.close()
    keys = {j.candidate.key() for j in done}
    return done + [j for j in judged if j.candidate.key() not in keys], seconds


def _screen(geo: Geometry, cands: list[Candidate], tasks: list[str], rule: str,
            floor: float) -> list[Judged]:
    """Judge every distinct candidate by the geometry alone, best first."""
    judged = []
    seen: set[tuple] = set()
    for c in cands:
        if c.key() in seen:
            continue
        seen.add(c.key())
        s = geo.screen(c)
        judged.append(Judged(c, s, value=objective(s.proxy, tasks, rule, floor)))
    judged.sort(key=lambda j: -j.value)
    return judged


def _judge_own(own: Candidate | None, report: Any, score: str, geo: Geometry, tasks: list[str],
               rule: str, floor: float) -> list[Judged]:
    """The config as written, judged by the guard's own rehearsal of it (when that ran)."""
    done: list[Judged] = []
    if own is not None and report.rehearsal is not None and report.rehearsal.status == "ran":
        j = Judged(own, geo.screen(own), {m.task: getattr(m, score) for m in report.models},
                   {m.task: m.rehearsal_token_agreement for m in report.models},
                   {m.task: m.rehearsal_agreement for m in report.models},
                   sum(report.run_info.seconds.get(f"rehearsal.{k}", 0)
                       for k in ("merge", "compare")))
        done.append(valued(j, tasks, rule, floor))
    return done


def own_candidate(pool: Pool) -> Candidate | None:
    """The pool's config as written, as a candidate (None when it names no method, or when its
    parameters are not one weight and density per model)."""
    from mergekit_collapse.guard.weights import scalar

    if not pool.own:
        return None
    merge = pool.cfg.merge
    members = tuple(range(len(pool.refs)))
    params = {m.model: (m.parameters or {}) for m in merge.models}
    top = dict(merge.parameters or {})
    if {k for p in params.values() for k in p} - {"weight", "density"}:
        return None
    kept = tuple(sorted((k, v) for k, v in top.items() if k not in ("weight", "density")
                        and isinstance(v, (int, float, bool))))
    if len(kept) < len(top) - len({"weight", "density"} & set(top)):
        return None  # a global parameter that is not a number (a gradient, conditions)
    written = [params[m].get("weight", top.get("weight")) for m in pool.cfg.models]
    weights, ramp = None, None
    if "weight" in method_parameters(merge.merge_method) and None not in written:
        if (parsed := _written_weights(written)) is None:
            return None  # conditions, or gradients that are not one ramp
        weights, ramp = parsed
    d = {scalar(params[m].get("density", top.get("density"))) for m in pool.cfg.models}
    if len(d) > 1 or (d != {None} and not sparsifies(merge.merge_method)):
        return None
    c = Candidate(members, merge.merge_method, weights, d.pop(), origin="as written",
                  globals=kept, ramp=ramp)
    return c if rejection(pool, c) is None else None


def _written_weights(values: list[Any]) -> tuple[tuple[float, ...], Ramp | None] | None:
    """(weights, ramp) of the members' `weight` values as written: numbers, or one gradient that
    every member shares; None for anything else (conditions, different gradients)."""
    if all(isinstance(v, (int, float)) for v in values):
        return tuple(float(v) for v in values), None
    if all(isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)
           for v in values) and len({tuple(v) for v in values}) == 1:
        return (1.0,) * len(values), tuple(float(x) for x in values[0])
    return None


def check_floor(floor: float | None) -> float:
    """The floor in use: the given one, else the calibrated rehearsal collapse edge."""
    if floor is not None:
        if not 0 <= floor <= 1:
            raise BadInputError(f"--floor {floor} is not a retention: give a number in [0, 1]")
        return floor
    cal = load_calibration()
    return cal.rehearsal.bands.collapse if cal.rehearsal else 0.5
