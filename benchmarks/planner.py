"""The merge planner on the SmolLM2 zoo, judged by real lm-eval (RESULTS.md, "Planner").

For each pool (by default three of the validity run's groups, whose uniform all-in merges were
measured there), the planner's pick and the pick of a random search given the same number of
rehearsals are merged with mergekit and lm-evaluated on the zoo's documents; the uniform all-in
merge per method and the best measured merge whose tasks lie in the pool (the oracle of what the
validity run tried) come from benchmarks/results/records.jsonl. A task left out of a merge counts
as retention 0 (it is not in the merged model); a task is kept when its retention is ≥ 0.7 (loss
above −30 %, the validity run's collapse threshold).

    python benchmarks/planner.py --zoo /tmp/zoo --out benchmarks/results/planner.json
    pip install -e '.[bench]'   # cma, for the labelled search:
    python benchmarks/planner.py --zoo /tmp/zoo --out benchmarks/results/planner.json \
        --labelled benchmarks/results/planner-labelled.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mergekit_collapse.runtime import Runtime

sys.path.insert(0, str(Path(__file__).parent))
from validity import guard_config  # noqa: E402

RECORDS = Path(__file__).parent / "results" / "records.jsonl"
POOLS = ["animal+arithmetic+continent+next_letter",
         "animal+arithmetic+continent+next_letter+sentiment",
         "animal+arithmetic+continent+json_record+sentiment+word_language"]
KEPT = 0.7


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def records(path: Path = RECORDS) -> dict[tuple[str, frozenset[str]], dict[str, float]]:
    """Measured retention (1 + loss/100) by task, per (method, task set)."""
    out: dict[tuple[str, frozenset[str]], dict[str, float]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["loss"] is None:
            continue
        tasks = frozenset(r["group"].split(":", 1)[1].split("+"))
        out.setdefault((r["method"], tasks), {})[r["task"]] = 1 + r["loss"] / 100
    return out


def score(retention: dict[str, float], pool: list[str]) -> dict[str, float]:
    r = [retention.get(t, 0.0) for t in pool]
    return {"mean": sum(r) / len(r), "kept": sum(x >= KEPT for x in r), "worst": min(r)}


def pool_yaml(zoo: Path, tasks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    raw = guard_config(zoo, tasks, "task_arithmetic", k=5, pooling="last", layer=-1)
    raw.pop("merge_method")
    raw.pop("parameters", None)
    for m in raw["models"]:
        m.pop("parameters", None)
    raw["guard"]["plan"] = {"methods": args.methods.split(","), "weights": [0.5, 1.0],
                            "densities": [0.5], "rehearsals": args.rehearsals,
                            "refine": args.refine, "confirm": args.confirm,
                            "objective": args.objective}
    return raw


def evaluate(pool: Any, cand: Any, folder: Path,
             args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """Merge a candidate with mergekit and lm-eval it: (retention by task, seconds)."""
    from mergekit_collapse.planner.space import candidate_raw

    return evaluate_raw(candidate_raw(pool, cand), folder, args)


def evaluate_raw(raw: dict[str, Any], folder: Path, args: argparse.Namespace,
                 evals: dict[str, str] | None = None) -> tuple[dict[str, float], float]:
    """Merge a mergekit config (once) and lm-eval it: (retention by task, seconds). `evals`
    replaces the tasks' lm-eval YAMLs (by model reference): the labelled search's dev split."""
    from mergekit.options import MergeOptions

    from mergekit_collapse.evaluate.observed import evaluate_merge
    from mergekit_collapse.guard.config import parse_config
    from mergekit_collapse.merge import merge_config

    t0 = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    scored = copy.deepcopy(raw)
    for ref, yaml_path in (evals or {}).items():
        scored["guard"]["tasks"][ref]["eval"] = yaml_path
    text = yaml.safe_dump(scored, sort_keys=False)
    path = folder.parent / f"{folder.name}{'-dev' if evals else ''}.yml"
    path.write_text(text)
    if not (folder / "config.json").is_file():
        merge_config(raw, folder, MergeOptions(lora_merge_cache=str(args.work / "lora_cache"),
                                               copy_tokenizer=True, quiet=True, lazy_unpickle=False,
                                               random_seed=0))
    ev = evaluate_merge(folder, parse_config(text, path), limit=args.limit, progress=False,
                        dtype=args.eval_dtype)
    ret = {t.task: (t.merged / t.constituent if t.constituent else 1.0) for t in ev.tasks}
    return ret, time.perf_counter() - t0


def random_search(pool: Any, run: Any, n: int, seed: int, rule: str, floor: float,
                  confirm_top: int = 0) -> tuple[Any, float]:
    """The best of `n` random grid candidates by the same rehearsal objective, its best
    `confirm_top` confirmed on the second probe sample as the planner's are."""
    from mergekit_collapse._console import Progress
    from mergekit_collapse.guard.assess import extraction_settings
    from mergekit_collapse.planner.search import Rehearser, confirm, geometry, valued
    from mergekit_collapse.planner.space import candidates

    t0 = time.perf_counter()
    cands, _ = candidates(pool, list(pool.space.methods))
    picks = random.Random(seed).sample(cands, min(n, len(cands)))
    reh = Rehearser(pool, geometry(pool, run), run.probes,
                    extraction_settings(pool.cfg, Runtime(dtype="float32")), None)
    judged = sorted((valued(reh(c), pool.tasks, rule, floor) for c in picks),
                    key=lambda j: -j.value)
    judged = confirm(judged, lambda j: valued(reh.confirmed(j), pool.tasks, rule, floor),
                     confirm_top, progress=Progress("confirm", 0, enabled=False))
    return judged[0].candidate, time.perf_counter() - t0


def dev_split(zoo: Path, work: Path) -> Path:
    """lm-eval YAMLs over a dev split the held-out scoring never reads: each task's test documents
    from #100 on (the scoring reads the first `--limit`, at most 100)."""
    from mergekit_collapse.demo.zoo.taskfiles import ALL_TASKS, read_jsonl, write_task_yamls

    data = work / "dev-data"
    for task in ALL_TASKS:
        src = zoo / "tasks" / task
        if not (src / "test.jsonl").is_file():
            continue
        (data / task).mkdir(parents=True, exist_ok=True)
        rows = read_jsonl(src / "test.jsonl")[100:]
        (data / task / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        shutil.copy(src / "train.jsonl", data / task / "train.jsonl")
    return write_task_yamls(work / "dev-tasks", data)


def labelled_search(pool: Any, tasks: list[str], zoo: Path, work: Path, wall: float,
                    args: argparse.Namespace) -> dict[str, Any]:
    """A labelled search in mergekit-evolve's manner: CMA-ES (`cma`, as mergekit-evolve) over
    the all-in TIES merge's per-model weight and density (mergekit-evolve's genotype: x0 weight
    1/n and density 1, sigma0 1/6, |weight|, density clamped to [0, 1]), each candidate merged
    with mergekit and lm-evaluated on the dev split (`dev_split`). Each new best is also scored
    on the held-out documents (outside its clock), so the curve says when it reaches a quality.
    `wall`: the planner's wall time, for the best found within it."""
    import cma

    from mergekit_collapse.planner.space import Candidate, candidate_raw

    n = len(tasks)
    dev = dev_split(zoo, work)
    evals = {str(ref): str(dev / f"zoo_{t}.yaml") for ref, t in zip(pool.cfg.models, tasks,
                                                                     strict=True)}
    base_raw = candidate_raw(pool, Candidate(tuple(range(n)), "ties", (1.0,) * n, 1.0))
    es = cma.CMAEvolutionStrategy([1 / n] * n + [1.0] * n, 1 / 6,
                                  {"seed": args.seed + 1, "popsize": args.cma_popsize,
                                   "maxfevals": args.cma_evals, "verbose": -9})
    clock, history, best = 0.0, [], None
    while not es.stop():
        xs = es.ask()
        fitness = []
        for x in xs:
            w = [round(abs(float(v)), 4) for v in x[:n]]
            d = [round(min(max(abs(float(v)), 0.0), 1.0), 4) for v in x[n:]]
            raw = copy.deepcopy(base_raw)
            for m, wi, di in zip(raw["models"], w, d, strict=True):
                m["parameters"] = {"weight": wi, "density": di}
            folder = work / "merges" / f"cma-{len(history)}"
            ret, sec = evaluate_raw(raw, folder, args, evals)
            clock += sec
            value = sum(ret.get(t, 0.0) for t in tasks) / n
            row = {"eval": len(history), "seconds": round(clock, 1), "dev_mean": round(value, 4),
                   "weights": w, "densities": d, "load": load()}
            if best is None or value > best["dev_mean"]:
                test, _ = evaluate_raw(raw, folder, args)  # held out: not on the search's clock
                row["test"] = score(test, tasks) | {"observed": test}
                best = row
            history.append(row)
            shutil.rmtree(folder, ignore_errors=True)
            fitness.append(-value)
        es.tell(xs, fitness)
    within = [r for r in history if "test" in r and r["seconds"] <= wall]
    return {"evals": len(history), "seconds": round(clock, 1), "history": history,
            "best": best, "best_within_planner_wall": within[-1] if within else None,
            "popsize": args.cma_popsize}


def random_pools(zoo: Path, n: int, sizes: str, seed: int) -> list[str]:
    """`n` distinct random task sets of the zoo's trained tasks, of sizes in `LO-HI` (seeded)."""
    from mergekit_collapse.demo.zoo import ALL_TASKS

    tasks = [t for t in ALL_TASKS if (zoo / "adapters" / t).is_dir()]  # either family's zoo
    lo, hi = (int(x) for x in sizes.split("-"))
    rng, out = random.Random(f"pools:{seed}"), []
    while len(out) < n:
        pick = "+".join(sorted(rng.sample(tasks, rng.randint(lo, min(hi, len(tasks))))))
        if pick not in out:
            out.append(pick)
    return out


def describe(pool: Any, c: Any) -> str:
    w = ("" if c.weights is None or c.method == "linear"
         else " w" + "/".join(f"{x:g}" for x in c.weights))
    d = "" if c.density is None else f" d{c.density:g}"
    return f"{c.method}{w}{d}: {'+'.join(pool.tasks[i] for i in c.members)}"


def one_pool(zoo: Path, tasks: list[str], i: int, args: argparse.Namespace,
             measured: dict) -> dict[str, Any]:
    from mergekit_collapse.guard.assess import run_guard
    from mergekit_collapse.planner.api import plan
    from mergekit_collapse.planner.search import check_floor
    from mergekit_collapse.planner.space import Candidate, load_pool

    work = args.work / f"pool{i}"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pool.yml"
    path.write_text(yaml.safe_dump(pool_yaml(zoo, tasks, args), sort_keys=False))
    row: dict[str, Any] = {"pool": tasks, "load_start": load()}
    t0 = time.perf_counter()
    result = plan(path, out=work / "plan", runtime=Runtime(dtype="float32"))
    row["planner_seconds"] = round(time.perf_counter() - t0, 1)
    row["planner_load"] = load()
    pick_dump = result.finalists[0].model_dump(exclude={"relative_distortion", "proxy"})
    row["planner"] = {"pick": pick_dump,
                      "rehearsed": result.rehearsed, "screened": result.screened,
                      "confirmed": sum(f.confirmed for f in result.finalists),
                      "seconds": result.seconds}
    pool = load_pool(path)
    f = result.finalists[0]
    pick = Candidate(tuple(pool.tasks.index(t) for t in f.tasks), f.method,
                     tuple(f.weights) if f.weights else None, f.density,
                     ramp=tuple(f.ramp) if f.ramp else None)
    ret, sec = evaluate(pool, pick, work / "merges" / "planner", args)
    row["planner"] |= {"observed": ret, "eval_seconds": round(sec, 1), "name": describe(pool, pick),
                       **score(ret, tasks)}
    run = run_guard(pool.cfg, runtime=Runtime(dtype="float32", progress=False), rehearse="off")
    rnd, rsec = random_search(pool, run, result.rehearsed, args.seed, args.objective,
                              check_floor(pool.space.floor), pool.space.confirm)
    ret, sec = evaluate(pool, rnd, work / "merges" / "random", args)
    row["random"] = {"name": describe(pool, rnd), "seconds": round(rsec, 1), "observed": ret,
                     "eval_seconds": round(sec, 1), "load": load(), **score(ret, tasks)}
    pool_set = set(tasks)
    row["uniform"] = {m: score(measured[(m, frozenset(tasks))], tasks)
                      for m in ("linear", "task_arithmetic", "ties")
                      if (m, frozenset(tasks)) in measured}
    if args.measure_uniform:  # the all-in merges the records lack, merged and scored now
        for m in set(args.methods.split(",")) - set(row["uniform"]):
            c = Candidate(tuple(range(len(tasks))), m, (1.0,) * len(tasks),
                          0.5 if m in ("ties", "dare_ties") else None)
            ret, _ = evaluate(pool, c, work / "merges" / f"uniform-{m}", args)
            row["uniform"][m] = score(ret, tasks) | {"measured_now": True}
    inside = [(k, score(v, tasks)) for k, v in measured.items() if k[1] <= pool_set]
    (m, group), best = max(inside, key=lambda kv: (kv[1]["mean"], kv[1]["kept"]))
    row["oracle"] = {"name": f"{m}: {'+'.join(sorted(group))}", "candidates": len(inside), **best}
    row["load_end"] = load()
    return row


def labelled_pool(zoo: Path, row: dict[str, Any], i: int, args: argparse.Namespace) -> dict:
    """The labelled search on a pool of `planner.json`, against the planner's measured pick."""
    from mergekit_collapse.planner.space import load_pool

    tasks = row["pool"]
    work = args.work / f"labelled{i}"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pool.yml"
    path.write_text(yaml.safe_dump(pool_yaml(zoo, tasks, args), sort_keys=False))
    out = labelled_search(load_pool(path), tasks, zoo, work, row["planner_seconds"], args)
    return {"pool": tasks, "planner": {k: row["planner"][k] for k in ("name", "mean", "kept")}
            | {"seconds": row["planner_seconds"]}, "labelled": out}


def labelled_table(rows: list[dict[str, Any]]) -> str:
    out = ["| pool | planner: mean / kept / wall s | labelled (CMA-ES) within the planner's wall | "
           "labelled best after N evals: mean / kept / wall s | first labelled best ≥ planner's "
           "mean: wall s (planner's share) |",
           "|---|---|---|---|---|"]
    for r in rows:
        p, lab = r["planner"], r["labelled"]
        w = lab["best_within_planner_wall"]
        within = (f"{w['test']['mean']:.3f} / {w['test']['kept']} (eval {w['eval']}, "
                  f"{w['seconds']:.0f} s)" if w else "none: its first evaluation ends later")
        b = lab["best"]
        reach = next((h for h in lab["history"] if "test" in h
                      and h["test"]["mean"] >= p["mean"]), None)
        share = (f"{reach['seconds']:.0f} s ({p['seconds'] / reach['seconds']:.0%})" if reach
                 else f"not reached in {lab['evals']} evals ({lab['seconds']:.0f} s)")
        out.append(f"| {len(r['pool'])}: {'+'.join(r['pool'])} | {p['mean']:.3f} / {p['kept']} / "
                   f"{p['seconds']:.0f} | {within} | {b['test']['mean']:.3f} / {b['test']['kept']} "
                   f"/ {lab['seconds']:.0f} (N = {lab['evals']}) | {share} |")
    return "\n".join(out)


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| pool | strategy | merge | mean retention | kept (≥ 0.7) | "
           "wall s | load (1/5/15 min) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{len(r['pool'])}: " + "+".join(r["pool"])
        p = r["planner"]
        budget = f"{p['rehearsed']} rehearsals" + (f", {c} confirmed" if (c := p.get("confirmed"))
                                                   else "")
        out.append(f"| {name} | **planner** ({budget}) | {p['name']} | "
                   f"**{p['mean']:.3f}** | {p['kept']} | {r['planner_seconds']:.0f} | "
                   f"{r['planner_load']} |")
        q = r["random"]
        out.append(f"| | random search ({budget}) | {q['name']} | "
                   f"{q['mean']:.3f} | {q['kept']} | {q['seconds']:.0f} | {q['load']} |")
        for m, s in r["uniform"].items():
            where = "measured now" if s.get("measured_now") else "records"
            out.append(f"| | uniform all-in ({where}) | {m} | {s['mean']:.3f} | "
                       f"{s['kept']} | — | — |")
        o = r["oracle"]
        out.append(f"| | oracle: best of {o['candidates']} measured (records) | {o['name']} | "
                   f"{o['mean']:.3f} | {o['kept']} | — | — |")
    return "\n".join(out)


def fit_retention() -> str:
    """Mean observed retention at each rehearsal-agreement level
    (planner.search.RETENTION_AT_LEVEL)."""
    import numpy as np

    reh = {(r["group"], r["task"]): r["rehearsal_agreement"]
           for r in map(json.loads, (RECORDS.parent / "rehearsal.jsonl").read_text().splitlines())}
    by: dict[float, list[float]] = {}
    for line in RECORDS.read_text().splitlines():
        r = json.loads(line)
        if r["loss"] is not None and (r["group"], r["task"]) in reh:
            by.setdefault(round(reh[(r["group"], r["task"])], 1), []).append(1 + r["loss"] / 100)
    return "\n".join(f"agreement {a:.1f}: n {len(v)}, mean retention {np.mean(v):.3f}"
                     for a, v in sorted(by.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=Path("/tmp/zoo"),
                   help="the exported zoo (exported if absent)")
    p.add_argument("--work", type=Path, default=Path("/tmp/planner-bench"))
    p.add_argument("--pools", default=",".join(POOLS),
                   help="comma-separated task sets (a+b+c); '' for none")
    p.add_argument("--random-pools", type=int, default=0, metavar="N",
                   help="also N random task sets of the zoo (seeded by --seed)")
    p.add_argument("--pool-sizes", default="4-8", metavar="LO-HI",
                   help="sizes of the random task sets")
    p.add_argument("--methods", default="linear,task_arithmetic,ties")
    p.add_argument("--rehearsals", type=int, default=6)
    p.add_argument("--refine", type=int, default=2)
    p.add_argument("--confirm", type=int, default=3,
                   help="the best of the N best merges rehearsed again on a second probe sample "
                        "(planner and random search alike; 0: off, as before 2026-12-06)")
    p.add_argument("--objective", default="mean")
    p.add_argument("--limit", type=int, default=24, help="lm-eval documents per task")
    p.add_argument("--eval-dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "planner.json")
    p.add_argument("--records", type=Path, default=RECORDS,
                   help="the validity run's records (the uniform merges and the oracle)")
    p.add_argument("--measure-uniform", action="store_true",
                   help="merge and score the all-in merges the records lack")
    p.add_argument("--labelled", type=Path, default=None, metavar="OUT_JSON",
                   help="run the labelled CMA-ES search on the pools of --out (planner.json) and "
                        "write it here")
    p.add_argument("--cma-evals", type=int, default=16, help="labelled search: evaluations")
    p.add_argument("--cma-popsize", type=int, default=8, help="labelled search: population")
    p.add_argument("--fit-retention", action="store_true",
                   help="print the agreement -> retention table the planner ships, and exit")
    args = p.parse_args(argv)
    if args.fit_retention:
        print(fit_retention())
        return 0
    if not (args.zoo / "adapters").is_dir():
        from mergekit_collapse.demo.zoo import export_zoo

        export_zoo(args.zoo)
    if args.labelled is not None:
        done = []
        for i, row in enumerate(json.loads(args.out.read_text())):
            done.append(labelled_pool(args.zoo.resolve(), row, i, args))
            args.labelled.write_text(json.dumps(done, indent=2) + "\n")
            print(labelled_table(done), flush=True)
        return 0
    measured = records(args.records)
    rows = []
    pools = args.pools.split(",") if args.pools else []
    if args.random_pools:
        pools += random_pools(args.zoo, args.random_pools, args.pool_sizes, args.seed)
    for i, pool in enumerate(pools):
        rows.append(one_pool(args.zoo.resolve(), pool.split("+"), i, args, measured))
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
