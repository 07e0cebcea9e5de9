"""Predictive validity on the zoos (real SmolLM2-135M-Instruct or Gemma 3 270M + task LoRAs).

All pairs of tasks (as the paper's Table 18) and random groups of 4-8 tasks are merged with real
mergekit (linear, task_arithmetic, ties; dare_ties and slerp on pairs), each constituent's merging
loss (Eq. 1) is measured with lm-eval, and every predictor is computed beside it: the paper's
HiddenSim / MDS, the exact geometry (distortion under alpha* and under the merge's own weights),
the base-anchored retention and relative distortion (pre-merge) and observed retention
(post-merge), at two poolings and two layers, the four parameter-conflict metrics, and
MergeLens's compatibility score. Records are appended as each merge finishes, so the run is
resumable and a time budget leaves a usable, balanced subset (experiments run in a seeded
shuffled order); `--shard I/N` splits the plan over N processes.

    python benchmarks/validity.py --work /tmp/validity --minutes 240 --calibrate last-1
    python benchmarks/validity.py --work /tmp/validity --analyse   # tables only
    python benchmarks/validity.py --family gemma3 --work /tmp/validity-gemma3 --rehearse-inline
    python benchmarks/validity.py --oos --lobo /tmp/validity-gemma3   # leave one base out

Writes <work>/records.jsonl (the merge records `mergekit-collapse stats/calibrate` read) and
<work>/validity.md (the tables RESULTS.md quotes).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import itertools
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_collapse.guard import geometry
from mergekit_collapse.guard.assess import assess, extraction_settings
from mergekit_collapse.guard.config import parse_config
from mergekit_collapse.guard.extract import extract
from mergekit_collapse.guard.probes import build_probes
from mergekit_collapse.guard.rehearsal import partial_credit
from mergekit_collapse.runtime import Runtime

METHODS = {
    # linear: the average; task_arithmetic: the sum (lambda 1); ties: density 0.5, sign election
    "linear": {"params": {"weight": 1.0}, "global": {}},
    "task_arithmetic": {"params": {"weight": 1.0}, "global": {"lambda": 1.0}},
    "ties": {"params": {"weight": 1.0, "density": 0.5}, "global": {"lambda": 1.0}},
    # pairs only: DARE (random drop 0.5, rescaled, sign election; seeded) and SLERP at t = 0.5
    "dare_ties": {"params": {"weight": 1.0, "density": 0.5}, "global": {"lambda": 1.0}},
    "slerp": {"params": {}, "global": {"t": 0.5}},
}
PAIR_ONLY = ("dare_ties", "slerp")
#: the guard's default (pooling, layer), as the records' column suffix
DEFAULT_SETTING = "last-1"
#: (pooling, layer) settings every predictor is computed at; the first is the guard's default
SETTINGS = [("mean", -1), ("last", -1), ("mean", 16), ("last", 16)]
PER_MODEL = ("mds_group", "distortion_optimal", "distortion_planned", "retention",
             "relative_distortion")


def base_dir(zoo: Path) -> Path:
    """The zoo's base model folder (an export holds one: `smollm2` or `gemma3`)."""
    from mergekit_collapse.demo.base_model import FAMILIES

    return next(zoo / f for f in FAMILIES if (zoo / f / "config.json").is_file())


def ref(zoo: Path, task: str) -> str:
    return f"{base_dir(zoo)}+{zoo / 'adapters' / task}"


#: marks another seed's adapter of a task in the zoo: `date_iso@1`
SEED_MARK = "@"
#: probes per task in every rehearsal of the records (the guard's default k)
RECORD_PROBES = 5


def task_of(name: str) -> str:
    """The task a zoo model is trained on: `date_iso@1`, another seed's adapter, is `date_iso`."""
    return name.partition(SEED_MARK)[0]


def guard_config(zoo: Path, tasks: list[str], method: str, k: int, pooling: str = "mean",
                 layer: int = -1) -> dict[str, Any]:
    """The config as the guard sees it (always with the base, for the anchored predictors).

    SLERP's base is one of the pair, so the guard sees it as what it is at t = 0.5 to first order:
    the linear average of the two.
    """
    method = "linear" if method == "slerp" else method
    spec = METHODS[method]
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(base_dir(zoo)),
        "models": [{"model": ref(zoo, t), "parameters": dict(spec["params"])} for t in tasks],
        "dtype": "float32",
        "guard": {"k": k, "pooling": pooling, "layer": layer, "tasks": {ref(zoo, t): {
            "name": t, "probes": {"file": str(zoo / "tasks" / task_of(t) / "test.jsonl"),
                                  "field": "prompt"},
            "eval": str(zoo / "tasks" / f"zoo_{task_of(t)}.yaml")} for t in tasks}},
    }
    if spec["global"]:
        cfg["parameters"] = dict(spec["global"])
    if method == "linear":  # mergekit's linear would weigh a base_model in: the guard's anchor only
        cfg["guard"]["base"] = cfg.pop("base_model")
    return cfg


def mergekit_config(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    """What mergekit merges: linear takes no base model (it would weigh it as one more input);
    SLERP interpolates from the first model of the pair to the second."""
    out = {k: v for k, v in cfg.items() if k != "guard"}
    if method == "slerp":
        refs = [m["model"] for m in out["models"]]
        return {"merge_method": "slerp", "base_model": refs[0],
                "models": [{"model": r} for r in refs],
                "parameters": dict(METHODS["slerp"]["global"]), "dtype": out["dtype"]}
    return out


def experiments(tasks: list[str], n_groups: int, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """Every pair and `n_groups` random groups of 4-8 tasks with linear / task_arithmetic / ties,
    and dare_ties and slerp on a third of the pairs, in one seeded shuffle; then dare_ties and
    slerp on the other pairs. A time budget leaves a balanced subset of the first part (every
    method represented) before it spends anything on the rest."""
    rng = random.Random(seed)
    pairs = list(itertools.combinations(tasks, 2))
    groups = {tuple(sorted(rng.sample(tasks, rng.randint(4, 8)))) for _ in range(4 * n_groups)}
    groups_l = sorted(groups)[:n_groups] if len(groups) > n_groups else sorted(groups)
    rng.shuffle(groups_l)
    first = [(m, g) for g in [*pairs, *groups_l[:n_groups]] for m in METHODS if m not in PAIR_ONLY]
    second = [(m, g) for g in pairs for m in PAIR_ONLY]
    rng.shuffle(first)
    rng.shuffle(second)
    early = second[: len(second) // 3]
    first += early
    rng.shuffle(first)
    return first + second[len(early):]


#: the methods every soup (two seeds' adapters of one task) is merged with
SOUP_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")


def add_soups(zoo: Path, seed_dir: Path, tasks: list[str]) -> list[str]:
    """Copy another seed's adapters (`python -m mergekit_collapse.demo.zoo.train --seed 1 --out
    SEED_DIR`) into the zoo as `<task>@1`; their names."""
    soups = []
    for t in tasks:
        if (seed_dir / t / "adapter_config.json").is_file():
            shutil.copytree(seed_dir / t, zoo / "adapters" / f"{t}{SEED_MARK}1",
                            dirs_exist_ok=True)
            soups.append(f"{t}{SEED_MARK}1")
    return soups


def soup_experiments(soups: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Model soups: each task's two seeds merged with every method (merges that rarely collapse:
    the merge-level specificity needs them where task pairs nearly always collapse)."""
    return [(m, (task_of(s), s)) for s in soups for m in SOUP_METHODS]


def exp_id(method: str, group: tuple[str, ...]) -> str:
    return f"{method}:{'+'.join(group)}"


class Predictors:
    """Hidden states of base + every adapter at every setting, extracted once (then cached)."""

    def __init__(self, zoo: Path, tasks: list[str], k: int,
                 settings: list[tuple[str, int]] = SETTINGS):
        self.zoo, self.tasks, self.k, self.settings = zoo, tasks, k, settings
        self.probes = build_probes(parse_config(json.dumps(guard_config(zoo, tasks, "linear", k))))
        self.vectors: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.global_sim: dict[tuple[str, int], np.ndarray] = {}
        for pooling, layer in settings:
            cfg = parse_config(json.dumps(guard_config(zoo, tasks, "linear", k, pooling, layer)))
            settings = extraction_settings(cfg, Runtime(device="cpu", dtype="float32"))
            ext = extract([cfg.base, *cfg.models], self.probes.texts, settings, progress=True)
            self.vectors[(pooling, layer)] = ext.vectors
            self.hidden_size = ext.hidden_size
            h = np.stack([ext.vectors[str(m)] for m in cfg.models])
            # the paper's protocol: HiddenSim over the whole set of fine-tuned models
            sim, _ = geometry.hidden_sim(geometry.pairwise_distances(h).mean)
            self.global_sim[(pooling, layer)] = sim

    def group_probes(self, cfg: Any) -> tuple[Any, np.ndarray]:
        """The group's own probe set (as the guard builds it) and its rows in the full set."""
        probes = build_probes(cfg)
        position = {t: i for i, t in enumerate(self.probes.texts)}
        return probes, np.array([position[t] for t in probes.texts])

    def report(self, method: str, group: tuple[str, ...], pooling: str = "mean",
               layer: int = -1) -> Any:
        """The guard's report for this merge, on the group's own probes, from cached vectors."""
        raw = guard_config(self.zoo, list(group), method, self.k, pooling, layer)
        cfg = parse_config(json.dumps(raw))
        probes, rows = self.group_probes(cfg)
        vec = self.vectors[(pooling, layer)]
        hidden = np.stack([vec[str(m)][rows] for m in cfg.models])
        return assess(cfg, hidden, vec[str(cfg.base)][rows], probes=probes,
                      hidden_size=self.hidden_size, dtype="float32")

    def rows(self, method: str, group: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {t: {} for t in group}
        for pooling, layer in self.settings:
            suffix = "" if (pooling, layer) == SETTINGS[0] else f"@{pooling}{layer}"
            rep = self.report(method, group, pooling, layer)
            idx = [self.tasks.index(t) for t in group]
            sim = self.global_sim[(pooling, layer)]
            for i, (t, m) in enumerate(zip(group, rep.models, strict=True)):
                mean_sim = float(np.mean([sim[idx[i], j] for j in idx if j != idx[i]]))
                row = out[t]
                row["mean_hidden_sim" + suffix] = mean_sim
                row["mds" + suffix] = 1 / mean_sim if mean_sim > 0 else float("inf")
                row["mds_group" + suffix] = m.mds
                for name in PER_MODEL[1:]:
                    row[name + suffix] = getattr(m, name)
                row["exact_rel" + suffix] = rep.bounds.exact / rep.budget.scale
        return out


def standardised(work: Path, family: str, k: int, threshold: float) -> str:
    """The relative distortion with each hidden dimension divided by the base's spread over the
    probes in it, beside the raw one, on the merges of <work>/records.jsonl (AUROC, no fitting).

    Gemma 3's last hidden states carry a few massive dimensions (norms near 2e4) that dominate
    every squared distance; scaled by the base's own spread, each dimension counts by how much
    the probes move it. At the guard's default setting (last token, last layer), from the cache.
    """
    from mergekit_collapse.analysis.statistics import auroc, markdown_table
    from mergekit_collapse.demo.zoo import FAMILY_TASKS, export_zoo

    zoo = export_zoo(work / "zoo", family=family)
    tasks = [t for t in FAMILY_TASKS[family] if (zoo / "adapters" / t).is_dir()]
    pooling, layer = "last", -1
    full = parse_config(json.dumps(guard_config(zoo, tasks, "linear", k, pooling, layer)))
    texts = build_probes(full).texts
    settings = extraction_settings(full, Runtime(device="cpu", dtype="float32"))
    ext = extract([full.base, *full.models], texts, settings, progress=True)
    position = {t: i for i, t in enumerate(texts)}
    rows = at_setting(read_records(work), DEFAULT_SETTING)
    scaled: dict[tuple[str, str], float] = {}
    for gid in dict.fromkeys(r["group"] for r in rows):
        method, _, names = gid.partition(":")
        cfg = parse_config(json.dumps(guard_config(zoo, names.split("+"), method, k, pooling,
                                                   layer)))
        probes = build_probes(cfg)
        idx = np.array([position[t] for t in probes.texts])
        base = ext.vectors[str(cfg.base)][idx]
        spread = base.std(axis=0)
        spread = spread + 1e-3 * spread.mean()  # a dimension the probes do not move: not a 1/0
        hidden = np.stack([ext.vectors[str(m)][idx] for m in cfg.models]) / spread
        rep = assess(cfg, hidden, base / spread, probes=probes, hidden_size=ext.hidden_size,
                     dtype="float32")
        for task, m in zip(names.split("+"), rep.models, strict=True):
            scaled[(gid, task)] = m.relative_distortion
    table = []
    for sub, pick in SIZE_SUBSETS:
        sel = [r for r in rows if pick(r) and r["loss"] is not None]
        if not sel or (sub != "all" and len(sel) == len(rows)):
            continue
        y = np.array([r["loss"] < threshold for r in sel])
        raw = np.array([r["relative_distortion"] if r["relative_distortion"] is not None
                        else np.nan for r in sel], dtype=float)
        std = np.array([scaled.get((r["group"], r["task"])) or np.nan for r in sel], dtype=float)
        table.append([sub, len(sel), int(y.sum()), _f(auroc(raw, y).auroc),
                      _f(auroc(std, y).auroc)])
    return (f"{family}: relative distortion, raw and with each dimension scaled by the base's "
            f"spread over the probes ({DEFAULT_SETTING}); AUROC, collapsed = loss < "
            f"{threshold:g}%.\n\n" + markdown_table(
                ["subset", "n", "collapsed", "AUROC raw", "AUROC scaled"], table) + "\n")


def conflict_rows(zoo: Path, group: tuple[str, ...], cache: dict) -> dict[str, dict[str, float]]:
    """The conflict metrics (Eqs. 4-7), pairwise; a model's value is its mean over its pairs."""
    from mergekit_collapse.analysis.conflicts import METRICS, conflict_metrics

    values: dict[str, dict[str, list[float]]] = {t: {} for t in group}
    for pair in itertools.combinations(group, 2):
        if pair not in cache:
            cfg = parse_config(json.dumps(guard_config(zoo, list(pair), "linear", 1)))
            rep = conflict_metrics(cfg)
            cache[pair] = {f"conflict_{name}": rep.metric(name)[0][1] for name in METRICS}
        for t in pair:
            for name, v in cache[pair].items():
                if v is not None:
                    values[t].setdefault(name, []).append(v)
    return {t: {k: float(np.mean(v)) for k, v in d.items()} for t, d in values.items()}


def run(args: argparse.Namespace) -> None:
    from mergekit_collapse.demo.zoo import FAMILY_TASKS, export_zoo
    from mergekit_collapse.evaluate.observed import evaluate_merge

    work = Path(args.work)
    zoo = export_zoo(work / "zoo", family=args.family)
    tasks = [t for t in FAMILY_TASKS[args.family] if (zoo / "adapters" / t).is_dir()]
    records_path = work / "records.jsonl"
    done = set()
    if records_path.exists():
        done = {json.loads(line)["group"] for line in records_path.read_text().splitlines() if line}
    if args.soups:
        soups = add_soups(zoo, Path(args.soups), tasks)
        plan = soup_experiments(soups)
        tasks = [*tasks, *soups]
    else:
        plan = experiments(tasks, args.groups, args.seed)
    plan = [(m, g) for m, g in plan
            if (not args.only or m in args.only.split(",")) and len(g) <= args.max_size]
    shard, shards = (int(x) for x in args.shard.split("/"))
    print(f"{len(plan)} experiments, {len(done)} done; {len(tasks)} tasks; shard {shard}/{shards}",
          flush=True)
    t0 = time.time()
    settings = [s for s in SETTINGS if f"{s[0]}{s[1]}" in args.settings.split(",")]
    preds = Predictors(zoo, tasks, args.k, settings)
    print(f"predictors ready in {time.time() - t0:.0f}s", flush=True)
    conflicts: dict = {}
    merged_root = Path(args.scratch)
    for n, (method, group) in enumerate(plan):
        gid = exp_id(method, group)
        if gid in done or n % shards != shard:
            continue
        if time.time() - t0 > args.minutes * 60:
            print(f"time budget reached after {n} experiments", flush=True)
            break
        t1 = time.time()
        raw = guard_config(zoo, list(group), method, args.k)
        cfg = parse_config(json.dumps(raw))
        rows = preds.rows(method, group)
        conf = conflict_rows(zoo, group, conflicts) if not args.no_conflicts else {}
        out = merged_root / f"merged-{shard}"
        shutil.rmtree(out, ignore_errors=True)
        merge(mergekit_config(raw, method), out, work / "lora_cache", seed=args.seed)
        t_merge = time.time() - t1
        report = preds.report(method, group)
        ev = evaluate_merge(out, cfg, limit=args.limit, batch_size=16, report=report,
                            progress=False, dtype=args.eval_dtype)
        shutil.rmtree(out, ignore_errors=True)
        if args.rehearse_inline:
            rehearse_one(zoo, work, method, group, args)
        with records_path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # shards append to one file
            for o in ev.tasks:
                row = {"group": gid, "task": o.task, "method": method, "model": o.model,
                       "size": len(group), "loss": o.loss, "merged": o.merged,
                       "constituent": o.constituent, "metric": o.metric, "eval_dtype": ev.dtype,
                       "observed_retention": o.observed_retention,
                       **rows[o.task], **conf.get(o.task, {})}
                f.write(json.dumps(row) + "\n")
        losses = ", ".join(f"{o.task}:{o.loss:+.0f}" for o in ev.tasks if o.loss is not None)
        print(f"[{n + 1}/{len(plan)}] {gid}  merge {t_merge:.0f}s "
              f"total {time.time() - t1:.0f}s  {losses}", flush=True)


def rehearse_records(args: argparse.Namespace) -> None:
    """The rehearsal (label-free) of every merge in a records file, into <work>/rehearsal.jsonl.

    The merges are the records' own (same tasks, method, parameters and seed), merged again in
    memory; their losses stay in the records file, so no lm-eval run is repeated.
    """
    from mergekit_collapse.demo.zoo import export_zoo

    work = Path(args.work)
    zoo = export_zoo(work / "zoo", family=args.family)
    rows = [json.loads(x) for x in Path(args.records).read_text().splitlines() if x]
    plan = list(dict.fromkeys(r["group"] for r in rows))
    if args.reverse:  # a second process can work from the other end
        plan = plan[::-1]
    out_path = work / "rehearsal.jsonl"
    done = {json.loads(x)["group"] for x in out_path.read_text().splitlines() if x} \
        if out_path.exists() else set()
    shard, shards = (int(x) for x in args.shard.split("/"))
    t0 = time.time()
    for n, gid in enumerate(plan[: args.max_merges]):
        if gid in done or n % shards != shard:
            continue
        if time.time() - t0 > args.minutes * 60:
            print(f"time budget reached after {n} merges", flush=True)
            break
        method, _, names = gid.partition(":")
        r = rehearse_one(zoo, work, method, tuple(names.split("+")), args)
        print(f"[{n + 1}/{len(plan)}] {gid} {r}", flush=True)


def rehearse_one(zoo: Path, work: Path, method: str, group: tuple[str, ...],
                 args: argparse.Namespace) -> str:
    """Rehearse one merge in memory; append its rows to <work>/rehearsal.jsonl; a summary line."""
    from mergekit.config import MergeConfiguration

    from mergekit_collapse.guard.rehearsal import rehearse

    raw = guard_config(zoo, list(group), method, args.k)
    cfg = parse_config(json.dumps(raw))
    probes = build_probes(cfg)
    by_model = {str(m): [t for t, task in zip(probes.texts, probes.tasks, strict=True)
                         if task == cfg.task_of(m).name] for m in cfg.models}
    merge_cfg = MergeConfiguration.model_validate(mergekit_config(raw, method))
    r = rehearse(merge_cfg, cfg.models, by_model,
                 extraction_settings(cfg, Runtime(dtype=args.rehearse_dtype)),
                 answer_tokens=args.answer_tokens, seed=args.seed)
    with (work / "rehearsal.jsonl").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        for m in cfg.models:
            f.write(json.dumps({"group": exp_id(method, group), "task": cfg.task_of(m).name,
                                **r.models[str(m)], "seconds": r.seconds, "dtype": r.dtype}) + "\n")
    return f"{r.seconds} " + ", ".join(
        f"{cfg.task_of(m).name}:{r.models[str(m)]['rehearsal_token_agreement']:.2f}"
        for m in cfg.models)


def same_rehearsal(mine: Path, other: Path) -> str:
    """How many of `mine`'s (merge, task) rows have the same rehearsal scores in `other`: every
    value equal, and the largest differences, apart for randomised methods (DARE)."""
    def rows(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["group"], r["task"]): r
                for r in map(json.loads, path.read_text().splitlines()) if r}

    a, b = rows(mine), rows(other)
    keys = ("rehearsal_agreement", "rehearsal_token_agreement", "rehearsal_kl")
    lines = []
    for label, dare in (("deterministic methods", False), ("DARE (seeded per tensor now)", True)):
        common = [k for k in a if k in b and k[0].startswith("dare") == dare]
        same = [k for k in common if all(a[k][c] == b[k][c] for c in keys[:2])]
        kl = max((abs(a[k][keys[2]] - b[k][keys[2]]) for k in common), default=0.0)
        merges = len({k[0] for k in common})
        lines.append(f"{label}: {merges} merges, {len(common)} rows; agreement and token agreement "
                     f"identical on {len(same)}; max |KL difference| {kl:.2e}")
        lines += [f"  differs: {k[0]} {k[1]}: " + ", ".join(f"{c} {b[k][c]:.3f} -> {a[k][c]:.3f}"
                                                           for c in keys[:2])
                  for k in common if k not in same]
    return "\n".join(lines)


def merge(config: dict[str, Any], out: Path, lora_cache: Path, seed: int) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(lora_merge_cache=str(lora_cache), copy_tokenizer=True,
                                   quiet=True, lazy_unpickle=False, random_seed=seed))


def mergelens_scores(work: Path) -> dict[str, float]:
    """MergeLens's (base, task model) score per task, computed once into <work>/mergelens.json."""
    import tempfile

    from mergelens_score import mergelens_base_scores

    path = work / "mergelens.json"
    if not path.exists():
        zoo = work / "zoo"
        tasks = sorted(p.name for p in (zoo / "adapters").iterdir() if p.is_dir())
        t0 = time.time()
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            scores = mergelens_base_scores(
                base_dir(zoo), {t: zoo / "adapters" / t for t in tasks}, tmp)
        path.write_text(json.dumps({"scores": scores, "seconds": round(time.time() - t0)},
                                   indent=1))
    return json.loads(path.read_text())["scores"]


def with_mergelens(rows: list[dict[str, Any]], scores: dict[str, float]) -> None:
    """Add MergeLens's score for the merge (its own aggregate: the lowest member) and the model's
    own."""
    members: dict[str, list[str]] = {}
    for r in rows:
        members.setdefault(r["group"], []).append(r["task"])
    for r in rows:
        r["mergelens_mci"] = min(scores[t] for t in members[r["group"]])
        r["mergelens_model"] = scores[r["task"]]


def read_records(work: Path) -> list[dict[str, Any]]:
    path = work / "records.jsonl"
    if not path.is_file():
        sys.exit(f"no merge records in {work} yet "
                 "(the time budget ran out before the first merge?)")
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def at_setting(rows: list[dict[str, Any]], setting: str) -> list[dict[str, Any]]:
    """Rows re-keyed to one (pooling, layer) setting: `relative_distortion@last-1` becomes
    `relative_distortion` (the name the guard's report uses); other settings' columns go."""
    suffix = "" if setting == "mean-1" else f"@{setting}"
    out = []
    for r in rows:
        base = {k: v for k, v in r.items() if "@" not in k}
        if suffix:
            base.update({k[: -len(suffix)]: v for k, v in r.items() if k.endswith(suffix)})
        out.append(base)
    return out


def cross_check(rows: list[dict[str, Any]], other: Path, threshold: float) -> str:
    """Losses of the same (merge, task) in another records file (e.g. lm-eval in float32)."""
    theirs = {(r["group"], r["task"]): r for r in
              (json.loads(x) for x in other.read_text().splitlines() if x)}
    pairs = [(r["loss"], theirs[(r["group"], r["task"])]["loss"]) for r in rows
             if (r["group"], r["task"]) in theirs and r["loss"] is not None
             and theirs[(r["group"], r["task"])]["loss"] is not None]
    if not pairs:
        return f"cross-check with {other}: no common records"
    a, b = np.array(pairs).T
    agree = np.mean((a < threshold) == (b < threshold))
    return (f"cross-check with {other}: {len(pairs)} common records; |loss difference| median "
            f"{np.median(np.abs(a - b)):.1f}, mean {np.mean(np.abs(a - b)):.1f}, "
            f"max {np.max(np.abs(a - b)):.1f} points; collapsed/not agree on {agree:.0%}; "
            f"Pearson r {np.corrcoef(a, b)[0, 1]:.3f}")


def analyse(work: Path, threshold: float, other: Path | None = None) -> str:
    """Tables: a ranking of every predictor x setting, then per subset Pearson/Spearman/AUROC,
    ANOVA."""
    from mergekit_collapse.analysis.statistics import (
        anova,
        markdown_table,
        parse_records,
        summarize,
    )

    rows = read_records(work)
    if (work / "mergelens.json").exists():
        with_mergelens(rows, mergelens_scores(work))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    merges = len({r["group"] for r in rows})
    lines = [f"{len(rows)} records from {merges} merges; collapsed = loss < {threshold:g}%\n"]
    full = summarize(parse_records(text, "jsonl", source="records.jsonl"), threshold=threshold)
    lines += ["### Predictor ranking (all merges)\n",
              "AUROC in the predictor's own direction (0.5 = chance); ρ = Spearman with loss; "
              "within-task ρ and p beyond task: what the predictor adds to knowing the task "
              "(statistics.beyond_task).\n"]
    ranked = sorted(full.metrics, key=lambda m: -(m.auroc.auroc_best or 0))
    table = []
    for m in ranked:
        if m.metric in ("merged", "constituent", "size"):
            continue
        name, _, setting = m.metric.partition("@")
        if name.startswith(("conflict_", "mergelens_")):
            setting = "—"  # weight-space scores: no pooling, no layer
        c, a, b = m.correlation, m.auroc, m.beyond_task
        table.append([name, setting or "mean-1", c.n, _f(a.auroc_best), a.direction or "—",
                      _f(c.spearman_rho), _f(c.spearman_p), _f(b.within_rho), _f(b.p)])
    lines.append(markdown_table(["predictor", "setting", "n", "AUROC", "direction", "Spearman ρ",
                                 "p", "within-task ρ", "p beyond task"], table))
    default = at_setting(rows, DEFAULT_SETTING)
    subsets = [("pairs", lambda r: r["size"] == 2), ("groups of 4-8", lambda r: r["size"] > 2)]
    subsets += [(f"method {m}", lambda r, m=m: r["method"] == m) for m in METHODS]
    for title, pick in subsets:
        sel = [r for r in default if pick(r)]
        if len(sel) < 5:
            continue
        rep = summarize(parse_records("\n".join(json.dumps(r) for r in sel), "jsonl"),
                        threshold=threshold)
        rep.metrics = [m for m in rep.metrics if m.metric not in ("merged", "constituent", "size")]
        lines += [f"\n### {title}: the guard's default setting ({DEFAULT_SETTING})\n",
                  rep.to_markdown()]
    pairs = [r for r in rows if r["size"] == 2]
    if pairs:
        table = anova([r["loss"] for r in pairs], [r["task"] for r in pairs],
                      [r["method"] for r in pairs])
        lines += ["\n### ANOVA of loss on pairs (every method)", table.to_markdown()]
    if other is not None:
        lines += ["\n### Cross-check\n", cross_check(rows, other, threshold)]
    return "\n".join(lines)


def is_soup(r: dict[str, Any]) -> bool:
    """A merge of one task's adapters of two seeds (`--soups`)."""
    return SEED_MARK in r["group"]


#: the merges every out-of-sample table is split into
SIZE_SUBSETS = [("all", lambda r: True), ("all but soups", lambda r: not is_soup(r)),
                ("pairs", lambda r: r["size"] == 2 and not is_soup(r)),
                ("groups", lambda r: r["size"] > 2), ("soups", is_soup)]
#: the merge-level operating point of issue 22's target (sensitivity at specificity ≥ 0.75), fitted
#: with a margin on the training tasks
TARGET_SPECIFICITY = 0.8
#: per-model predictors judged out of sample: (column, riskier direction)
OOS_PREDICTORS = [("relative_distortion", "higher"), ("rehearsal_token_agreement", "lower"),
                  ("rehearsal_agreement", "lower"), ("rehearsal_partial", "lower"),
                  ("rehearsal_kl", "higher"), ("mds", "higher"),
                  ("conflict_sign_change_ratio", "higher"), ("exact_rel", "higher")]


def joined(records: Path, work: Path) -> list[dict[str, Any]]:
    """The records at the guard's default setting, with each merge's rehearsal columns, and
    `rehearsal_partial`: the agreement with partial credit from token agreement (ties between
    equal agreements broken by it; the same pass, no extra cost)."""
    rows = at_setting([json.loads(x) for x in records.read_text().splitlines() if x],
                      DEFAULT_SETTING)
    reh = {(r["group"], r["task"]): r for r in read_rehearsal(work)}
    out = [{**r, **{k: v for k, v in reh[(r["group"], r["task"])].items()
                    if k.startswith("rehearsal")}}
           for r in rows if (r["group"], r["task"]) in reh and r["loss"] is not None]
    for r in out:
        r["rehearsal_partial"] = partial_credit(r["rehearsal_agreement"],
                                                r["rehearsal_token_agreement"], RECORD_PROBES)
    return out


def both_bases(records: Path, work: Path, lobo: Path | None) -> dict[str, list[dict[str, Any]]]:
    """The joined rows by base (SmolLM2's, and with `lobo` Gemma's), each tagged with its base."""
    bases = {"smollm2": joined(records, work)}
    if lobo is not None:
        bases["gemma3"] = joined(lobo / "records.jsonl", lobo)
    return {b: [{**r, "base": b} for r in rows] for b, rows in bases.items()}


def read_rehearsal(work: Path) -> list[dict[str, Any]]:
    """The rehearsal rows, the first of each (merge, task) (two processes may meet)."""
    path = work / "rehearsal.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []
    return list({(r["group"], r["task"]): r for r in reversed(rows)}.values())[::-1]


def _edge(x: np.ndarray, y: np.ndarray, direction: str) -> float:
    """The collapse edge (Youden's J) fitted on (x, y), in the score's own units."""
    from mergekit_collapse.analysis.fitting import roc_cuts

    sign = 1.0 if direction == "higher" else -1.0
    cut, _ = roc_cuts(sign * x, y, sensitivity=0.9)
    return sign * cut.edge


def _flags(x: np.ndarray, edge: float, direction: str) -> np.ndarray:
    return x >= edge if direction == "higher" else x <= edge


def merge_edge(rows: list[dict[str, Any]], x: np.ndarray, direction: str,
               threshold: float, min_specificity: float | None = None) -> float:
    """The collapse edge that maximises the merge-level Youden J (a merge is stopped when any of
    its models is flagged), ties to the more specific edge; edges halfway between observed
    values. With `min_specificity`: the most sensitive edge whose merge-level specificity is at
    least that (the operating point of a sensitivity-at-specificity target), else the J edge."""
    values = np.unique(x[~np.isnan(x)])
    cuts = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
    best, best_j, best_sens = float(cuts[0]), -2.0, -1.0
    for edge in (cuts if direction == "lower" else cuts[::-1]):  # most specific first
        sens, spec, _, _ = merge_level(rows, _flags(x, edge, direction), threshold)
        sens, spec = (0 if np.isnan(sens) else sens), (0 if np.isnan(spec) else spec)
        if min_specificity is not None:
            if spec >= min_specificity and sens > best_sens + 1e-12:
                best, best_sens = float(edge), sens
        elif sens + spec - 1 > best_j + 1e-12:
            best, best_j = float(edge), sens + spec - 1
    return best


def leave_one_task_out(rows: list[dict[str, Any]], column: str, direction: str, threshold: float,
                       by_method: bool = False, merge_fit: bool = False,
                       min_specificity: float | None = None) -> np.ndarray:
    """Each row's collapse flag from an edge fitted on the other tasks' rows only (and, with
    `by_method`, on the rows of the same merge method); the edge maximises the model-level Youden
    J, or with `merge_fit` the merge-level one (`merge_edge`)."""
    x = np.array([r.get(column) if r.get(column) is not None else np.nan for r in rows],
                 dtype=float)
    y = np.array([r["loss"] < threshold for r in rows])
    task = np.array([task_of(r["task"]) for r in rows])  # a task's seeds leave together
    method = np.array([r["method"] for r in rows])
    flags = np.zeros(len(rows), dtype=bool)
    for t in np.unique(task):
        for m in (np.unique(method) if by_method else [None]):
            test = (task == t) & ((method == m) if m is not None else True)
            train = (task != t) & ((method == m) if m is not None else True) & ~np.isnan(x)
            if not test.any() or y[train].all() or not y[train].any():
                continue
            if merge_fit:
                keep = np.flatnonzero(train)
                edge = merge_edge([rows[i] for i in keep], x[keep], direction, threshold,
                                  min_specificity)
            else:
                edge = _edge(x[train], y[train], direction)
            flags[test] = _flags(x[test], edge, direction)
    return flags


def _rates(flag: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    return float(flag[y].mean()) if y.any() else float("nan"), \
        float((~flag[~y]).mean()) if (~y).any() else float("nan")


def merge_level(rows: list[dict[str, Any]], flags: np.ndarray,
                threshold: float) -> tuple[float, float, int, int]:
    """(sensitivity, specificity, merges that collapsed, merges that did not): a merge is stopped
    when any of its models is flagged, and collapsed when any of its models lost > |threshold|%."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["group"], []).append(i)
    stop = np.array([flags[idx].any() for idx in groups.values()])
    bad = np.array([any(rows[i]["loss"] < threshold for i in idx) for idx in groups.values()])
    sens, spec = _rates(stop, bad)
    return sens, spec, int(bad.sum()), int((~bad).sum())


def out_of_sample(rows: list[dict[str, Any]], threshold: float) -> tuple[str, dict[str, Any]]:
    """Per-model AUROC, and leave-one-task-out bands judged at model and merge level, per predictor,
    for all merges, pairs, groups and each method. Returns (markdown, the headline numbers)."""
    from mergekit_collapse.analysis.statistics import auroc, markdown_table

    subsets = [*SIZE_SUBSETS, *((m, lambda r, m=m: r["method"] == m) for m in METHODS),
               *((f"base {b}", lambda r, b=b: r.get("base") == b)
                 for b in sorted({r.get("base") for r in rows} - {None}))]
    n_merges = len({r["group"] for r in rows})
    lines = [f"{len(rows)} constituent losses from {n_merges} merges that were also rehearsed; "
             f"collapsed = loss < {threshold:g}%. AUROC needs no fitting; the sensitivity and "
             "specificity are of bands fitted with each task left out (LOTO: the held-out task's "
             "rows are judged by an edge fitted on the other tasks only).\n"]
    table = []
    headline: dict[str, Any] = {}
    loto = {(c, False): leave_one_task_out(rows, c, d, threshold) for c, d in OOS_PREDICTORS}
    loto[("relative_distortion", True)] = leave_one_task_out(rows, "relative_distortion", "higher",
                                                            threshold, by_method=True)
    merge_fit = {c: leave_one_task_out(rows, c, d, threshold, merge_fit=True)
                 for c, d in OOS_PREDICTORS if c in ("rehearsal_agreement", "relative_distortion")}
    variants = [(f"{c}", c, d, loto[(c, False)]) for c, d in OOS_PREDICTORS]
    variants.append(("relative_distortion, bands per method", "relative_distortion", "higher",
                     loto[("relative_distortion", True)]))
    for c, flags in merge_fit.items():
        d = dict(OOS_PREDICTORS)[c]
        variants.append((f"{c}, edge fitted for the merge verdict", c, d, flags))
    for c in ("rehearsal_agreement", "rehearsal_partial"):  # the target's operating point
        variants.append((f"{c}, edge at merge spec. ≥ {TARGET_SPECIFICITY:g}", c, "lower",
                         leave_one_task_out(rows, c, "lower", threshold, merge_fit=True,
                                            min_specificity=TARGET_SPECIFICITY)))
    for c in ("rehearsal_agreement", "rehearsal_token_agreement"):
        variants.append((f"either ({c} or relative_distortion)", None, None,
                         loto[(c, False)] | loto[("relative_distortion", False)]))
    # the bounds over the calibrated relative budget as a veto beside each signal
    for c in ("rehearsal_agreement", "relative_distortion"):
        variants.append((f"{c} or r*² over the relative budget", None, None,
                         loto[(c, False)] | loto[("exact_rel", False)]))
    for name, column, direction, flags in variants:
        for sub, pick in subsets:
            idx = [i for i, r in enumerate(rows) if pick(r)]
            if len(idx) < 10 or (sub != "all" and len(idx) == len(rows)):
                continue
            sel = [rows[i] for i in idx]
            y = np.array([r["loss"] < threshold for r in sel])
            a = None
            if column is not None:
                x = np.array([r.get(column) if r.get(column) is not None else np.nan
                              for r in sel], dtype=float)
                res = auroc(x if direction == "higher" else -x, y)
                a = res.auroc
            sens, spec = _rates(flags[idx], y)
            ms, mp, nb, ng = merge_level(sel, flags[idx], threshold)
            table.append([name, sub, len(sel), int(y.sum()), _f(a), _f(sens), _f(spec),
                          f"{nb}+{ng}", _f(ms), _f(mp)])
            headline[f"{name}|{sub}"] = {"n": len(sel), "auroc": a, "loto_sensitivity": sens,
                                         "loto_specificity": spec, "merge_sensitivity": ms,
                                         "merge_specificity": mp, "merges_collapsed": nb,
                                         "merges_fine": ng}
    lines.append(markdown_table(["predictor", "subset", "n", "collapsed", "AUROC", "LOTO sens.",
                                 "LOTO spec.", "merges", "merge sens.", "merge spec."], table))
    per_task = []
    for t in sorted({r["task"] for r in rows}):
        sel = [r for r in rows if r["task"] == t]
        y = np.array([r["loss"] < threshold for r in sel])
        ra = auroc(-np.array([r["rehearsal_agreement"] for r in sel]), y).auroc
        rd = auroc(np.array([r["relative_distortion"] if r["relative_distortion"] is not None
                             else np.nan for r in sel]), y).auroc
        per_task.append([t, len(sel), int(y.sum()), _f(ra), _f(rd)])
    lines += ["\n### Within each task (rehearsal agreement vs relative distortion)\n",
              markdown_table(["task", "n", "collapsed", "AUROC rehearsal",
                              "AUROC relative distortion"], per_task)]
    return "\n".join(lines) + "\n", headline


def leave_one_base_out(bases: dict[str, list[dict[str, Any]]],
                       threshold: float) -> tuple[str, dict[str, Any]]:
    """Each predictor's edges fitted on one base's merges and judged on the other base's: AUROC on
    the held-out base (no fitting), model-level sensitivity/specificity at the fitted base's Youden
    edge, merge-level ones at its merge-level edge (`merge_edge`) and at its operating point (the
    most sensitive edge at merge specificity ≥ `TARGET_SPECIFICITY`). Returns (markdown,
    headline)."""
    from mergekit_collapse.analysis.statistics import auroc, markdown_table

    table, headline = [], {}
    for (fit_on, src), (judged, tgt) in itertools.permutations(bases.items(), 2):
        for column, direction in OOS_PREDICTORS:
            xs = np.array([r.get(column) if r.get(column) is not None else np.nan
                           for r in src], dtype=float)
            ys = np.array([r["loss"] < threshold for r in src])
            ok = ~np.isnan(xs)
            if ok.sum() < 10 or ys[ok].all() or not ys[ok].any():
                continue
            edge = _edge(xs[ok], ys[ok], direction)
            keep = np.flatnonzero(ok)
            medge = merge_edge([src[i] for i in keep], xs[keep], direction, threshold)
            oedge = merge_edge([src[i] for i in keep], xs[keep], direction, threshold,
                               TARGET_SPECIFICITY)
            for sub, pick in SIZE_SUBSETS:
                sel = [r for r in tgt if pick(r)]
                x = np.array([r.get(column) if r.get(column) is not None else np.nan
                              for r in sel], dtype=float)
                y = np.array([r["loss"] < threshold for r in sel])
                if len(sel) < 10 or np.isnan(x).all() or (sub != "all" and len(sel) == len(tgt)):
                    continue
                a = auroc(x if direction == "higher" else -x, y).auroc
                sens, spec = _rates(_flags(x, edge, direction), y)
                ms, mp, nb, ng = merge_level(sel, _flags(x, medge, direction), threshold)
                os_, op, _, _ = merge_level(sel, _flags(x, oedge, direction), threshold)
                table.append([column, f"{fit_on} → {judged}", sub, len(sel), int(y.sum()), _f(a),
                              _f(sens), _f(spec), f"{nb}+{ng}", _f(ms), _f(mp), _f(os_), _f(op)])
                headline[f"{column}|{fit_on}->{judged}|{sub}"] = {
                    "n": len(sel), "auroc": a, "sensitivity": sens, "specificity": spec,
                    "merge_sensitivity": ms, "merge_specificity": mp, "merges_collapsed": nb,
                    "merges_fine": ng, "edge": edge, "merge_edge": medge,
                    "operating_point": {"edge": oedge, "merge_sensitivity": os_,
                                        "merge_specificity": op}}
    md = ("Leave one base out: every edge is fitted on the first base's merges only and judged on "
          "the second's (AUROC needs no fitting). Merge level: a merge is stopped when any of its "
          "models is flagged at the merge-level edge (Youden's J over merges), or at the operating "
          f"point (the most sensitive edge at merge specificity ≥ {TARGET_SPECIFICITY:g} on the "
          "fitted base).\n\n" + markdown_table(
              ["predictor", "fitted → judged", "subset", "n", "collapsed", "AUROC", "sens.",
               "spec.", "merges", "merge sens.", "merge spec.",
               f"merge sens. at spec. ≥ {TARGET_SPECIFICITY:g}", "its merge spec."], table))
    return md + "\n", headline


def calibrate_rehearsal(work: Path, records: Path, threshold: float, score: str,
                        decides: str | None, lobo: Path | None = None,
                        min_specificity: float | None = None) -> Path:
    """Add the rehearsal's bands (fitted on every rehearsed record), the deciding signal and the
    out-of-sample numbers (`out_of_sample`) to the packaged default calibration; write it to
    <work>/calibration.json (copy it over mergekit_collapse/guard/calibration_default.json to ship
    it).

    With `lobo` (the other base's work folder) both bases' records are fitted together: the
    rehearsal's bands, the risk score's bands and the relative budget; the leave-one-base-out
    numbers go beside the leave-one-task-out ones.

    `decides` None: the signal whose leave-one-task-out merge-level verdict has the larger
    sensitivity + specificity over all merges. `min_specificity`: the collapse edge is the most
    sensitive one at that merge-level specificity (`merge_edge`), else the merge-level J edge.
    """
    from mergekit_collapse.analysis.fitting import fit_calibration
    from mergekit_collapse.analysis.statistics import parse_records
    from mergekit_collapse.guard.calibration import SignalBands, load_calibration

    bases = both_bases(records, work, lobo)
    rows = [r for b in bases.values() for r in b]
    text = "".join(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}) + "\n"
                   for r in rows)
    fit = fit_calibration(parse_records(text, "jsonl"), score=score, direction="lower",
                          threshold=threshold)
    _, headline = out_of_sample(rows, threshold)
    if decides is None:
        def j(name: str) -> float:
            h = headline[f"{name}|all"]
            return h["merge_sensitivity"] + h["merge_specificity"]
        decides = "rehearsal" if j(score) >= j("relative_distortion") else "risk"
    cal = load_calibration(Path(__file__).parent.parent / "mergekit_collapse" / "guard"
                           / "calibration_default.json")
    # the verdict is about merges: its collapse edge maximises the merge-level J, or the
    # sensitivity at a specificity (the model-level fit's Youden edge is kept in
    # validity.youden_j); elevated stays the high-sensitivity edge
    x = np.array([r[score] for r in rows], dtype=float)
    collapse = merge_edge(rows, x, "lower", threshold, min_specificity)
    # elevated: the fitted high-sensitivity edge, or at least one probe's step above the collapse
    # edge: a merge one answer away from the collapse band
    step = 1 / RECORD_PROBES
    bands = fit.bands.model_copy(update={"collapse": collapse,
                                         "elevated": max(fit.bands.elevated, collapse + step)})
    cal.rehearsal = SignalBands(score=score, direction="lower", bands=bands, validity=fit.validity)
    cal.decides = decides
    if lobo is not None:
        from mergekit_collapse.demo.base_model import FAMILIES

        risk = fit_calibration(parse_records(text, "jsonl"), score=cal.score,
                               direction=cal.direction, threshold=threshold)
        cal.bands, cal.validity, cal.relative_budget = (risk.bands, risk.validity,
                                                        risk.relative_budget)
        files = [records, work / "rehearsal.jsonl", lobo / "records.jsonl",
                 lobo / "rehearsal.jsonl"]
        cal.source = {
            "name": "smollm2+gemma3", "bases": [FAMILIES[b].hub_id for b in bases],
            "files": {_shown(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
            "n": len(rows), "merges": len({r["group"] for r in rows}),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "setting": DEFAULT_SETTING,
            "note": ("12 SmolLM2-135M-Instruct zoo tasks and 8 other Gemma 3 270M zoo tasks, "
                     "merged with linear / task_arithmetic / ties (and dare_ties, slerp on "
                     "pairs), scored with lm-eval; every merge also rehearsed in memory"),
            "command": ("python benchmarks/validity.py --oos --lobo <gemma3 work> "
                        f"--calibrate-rehearsal {score}"
                        + (" --operating-point" if min_specificity is not None else ""))}
    if lobo is not None:
        _, lobo_headline = leave_one_base_out(bases, threshold)
        headline.update({f"lobo|{k}": v for k, v in lobo_headline.items()
                         if k.split("|")[0] in (score, "relative_distortion")})
    cal.out_of_sample = {"method": "leave one task out"
                         + (" and leave one base out" if lobo else "")
                         + " (benchmarks/validity.py --oos)",
                         "rehearsed_records": len(rows),
                         "merges": len({r["group"] for r in rows}),
                         "records_sha256": hashlib.sha256(records.read_bytes()).hexdigest(),
                         "rehearsal_sha256": hashlib.sha256(
                             (work / "rehearsal.jsonl").read_bytes()).hexdigest(),
                         "headline": {k: v for k, v in headline.items()
                                      if k.split("|")[0] in (
                                          score, f"{score}, edge fitted for the merge verdict",
                                          f"{score}, edge at merge spec. ≥ "
                                          f"{TARGET_SPECIFICITY:g}",
                                          "relative_distortion", "lobo")}}
    out = work / "calibration.json"
    out.write_text(cal.model_dump_json(indent=2) + "\n")
    return out


def calibrate(work: Path, setting: str, score: str, threshold: float) -> Path:
    """Fit the guard's default calibration on the records re-keyed to one (pooling, layer) setting.

    The setting's columns (e.g. `relative_distortion@last-1`) become the plain names the guard's
    report uses; the default relative budget is fitted on `exact_rel` (r*² / base probe spread).
    """
    from mergekit_collapse.analysis.fitting import fit_calibration_file

    keyed = at_setting(read_records(work), setting)
    path = work / f"records-{setting}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in keyed))
    cal, out = fit_calibration_file(path, out=work / "calibration.json", score=score,
                                    threshold=threshold)
    cal.source["setting"] = setting
    out.write_text(cal.model_dump_json(indent=2))
    return out


def _shown(path: Path) -> str:
    """A path relative to this repository when the file lies in it, else as given."""
    try:
        return str(path.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/validity")
    p.add_argument("--family", choices=["smollm2", "gemma3"], default="smollm2",
                   help="the zoo: SmolLM2-135M-Instruct (12 tasks) or Gemma 3 270M (8 others)")
    p.add_argument("--rehearse-inline", action="store_true",
                   help="rehearse each merge as it is run (into <work>/rehearsal.jsonl)")
    p.add_argument("--lobo", metavar="WORK", default=None,
                   help="with --oos: the other base's work folder (records.jsonl + "
                        "rehearsal.jsonl); adds leave-one-base-out tables, and "
                        "--calibrate-rehearsal fits on both")
    p.add_argument("--scratch", default="/dev/shm/mkc-validity", help="where merges are written")
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--limit", type=int, default=24, help="lm-eval documents per task")
    p.add_argument("--eval-dtype", default="bfloat16",
                   help="lm-eval dtype of the merges and their constituents (both alike)")
    p.add_argument("--groups", type=int, default=20)
    p.add_argument("--settings", default=",".join(f"{p}{layer}" for p, layer in SETTINGS),
                   help="the (pooling, layer) settings the predictors are computed at "
                        "(each costs a pass over every model)")
    p.add_argument("--soups", metavar="SEED_DIR", default=None,
                   help="merge each task's adapter with another seed's (trained into SEED_DIR) "
                        "with every method, instead of the plan of task pairs and groups")
    p.add_argument("--only", default=None, metavar="METHOD[,METHOD]",
                   help="run only these methods' experiments (in the plan's order)")
    p.add_argument("--max-size", type=int, default=99,
                   help="run only merges of at most this many models (2: the pairs)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run every N-th experiment from the I-th (N processes share --work)")
    p.add_argument("--threshold", type=float, default=-30.0)
    p.add_argument("--no-conflicts", action="store_true")
    p.add_argument("--analyse", action="store_true", help="only write the tables")
    p.add_argument("--mergelens", action="store_true",
                   help="only compute MergeLens's per-task scores (needs mergelens; a run does it "
                        "at its end when mergelens is installed)")
    p.add_argument("--calibrate", metavar="POOLING+LAYER", default=None,
                   help="also fit the guard's calibration at this setting, e.g. last-1")
    p.add_argument("--score", default="relative_distortion", help="the risk score to calibrate")
    p.add_argument("--rehearse", action="store_true",
                   help="only rehearse the merges of --records (label-free; into "
                        "<work>/rehearsal.jsonl)")
    p.add_argument("--records", default=str(Path(__file__).parent / "results" / "records.jsonl"))
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--reverse", action="store_true", help="--rehearse from the end of the plan")
    p.add_argument("--max-merges", type=int, default=None,
                   help="--rehearse only the first N merges of --records")
    p.add_argument("--standardised", action="store_true",
                   help="only compare the relative distortion raw and with each hidden dimension "
                        "scaled by the base's probe spread (<work>/standardised.md)")
    p.add_argument("--same-as", metavar="REHEARSAL_JSONL", default=None,
                   help="only compare <work>/rehearsal.jsonl with another run's, row by row")
    p.add_argument("--calibrate-rehearsal", metavar="SCORE", default=None,
                   help="with --oos: add the rehearsal's bands on SCORE (e.g. "
                        "rehearsal_token_agreement) to the default calibration")
    p.add_argument("--operating-point", action="store_true",
                   help="--calibrate-rehearsal's collapse edge: the most sensitive one at merge "
                        f"specificity ≥ {TARGET_SPECIFICITY:g} (else the merge-level J edge)")
    p.add_argument("--decides", choices=["risk", "rehearsal"], default=None,
                   help="with --calibrate-rehearsal: the deciding signal (default: the better one "
                        "out of sample)")
    p.add_argument("--oos", action="store_true",
                   help="only the out-of-sample tables of --records joined with "
                        "<work>/rehearsal.jsonl (<work>/oos.md, oos.json)")
    p.add_argument("--rehearse-dtype", default="auto")
    p.add_argument("--cross-check", metavar="RECORDS", default=None,
                   help="compare losses with another run's records (e.g. lm-eval in float32)")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.rehearse:
        rehearse_records(args)
        return 0
    if args.standardised:
        md = standardised(work, args.family, args.k, args.threshold)
        (work / "standardised.md").write_text(md)
        print(md)
        return 0
    if args.same_as:
        print(same_rehearsal(work / "rehearsal.jsonl", Path(args.same_as)))
        return 0
    if args.oos:
        md, headline = out_of_sample(joined(Path(args.records), work), args.threshold)
        (work / "oos.md").write_text(md)
        (work / "oos.json").write_text(json.dumps(headline, indent=1))
        print(md)
        lobo = Path(args.lobo) if args.lobo else None
        if lobo is not None:
            bases = both_bases(Path(args.records), work, lobo)
            md, headline = leave_one_base_out(bases, args.threshold)
            (work / "lobo.md").write_text(md)
            (work / "lobo.json").write_text(json.dumps(headline, indent=1))
            print(md)
            # both bases pooled (as the shipped calibration is fitted), judged per base
            md, headline = out_of_sample([r for b in bases.values() for r in b], args.threshold)
            (work / "oos-both.md").write_text(md)
            (work / "oos-both.json").write_text(json.dumps(headline, indent=1))
        if args.calibrate_rehearsal:
            print("calibration:", calibrate_rehearsal(
                work, Path(args.records), args.threshold, args.calibrate_rehearsal, args.decides,
                lobo, TARGET_SPECIFICITY if args.operating_point else None))
        return 0
    if not (args.analyse or args.mergelens):
        run(args)
    # MergeLens once per work folder (the first shard; skipped when mergelens is not installed)
    if args.mergelens or (not args.analyse and args.shard.startswith("0/")
                          and importlib.util.find_spec("mergelens") is not None):
        print(f"MergeLens scores: {mergelens_scores(work)}", flush=True)
    md = analyse(work, args.threshold, Path(args.cross_check) if args.cross_check else None)
    (work / "validity.md").write_text(md)
    print(md)
    if args.calibrate:
        print(f"calibration: {calibrate(work, args.calibrate, args.score, args.threshold)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
