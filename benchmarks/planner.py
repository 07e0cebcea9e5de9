"""The merge planner on the SmolLM2 zoo, judged by real lm-eval (RESULTS.md, "Planner").

For each pool (by default three of the validity run's groups, whose uniform all-in merges were
measured there), the planner's pick and the pick of a random search given the same number of
rehearsals are merged with mergekit and lm-evaluated on the zoo's documents; the uniform all-in
merge per method and the best measured merge whose tasks lie in the pool (the oracle of what the
validity run tried) come from benchmarks/results/records.jsonl. A task left out of a merge counts
as retention 0 (it is not in the merged model); a task is kept when its retention is ≥ 0.7 (loss
above −30 %, the validity run's collapse threshold).

    python benchmarks/planner.py --zoo /tmp/zoo --out benchmarks/results/planner.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def records() -> dict[tuple[str, frozenset[str]], dict[str, float]]:
    """Measured retention (1 + loss/100) by task, per (method, task set)."""
    out: dict[tuple[str, frozenset[str]], dict[str, float]] = {}
    for line in RECORDS.read_text().splitlines():
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
                            "refine": args.refine, "objective": args.objective}
    return raw


def evaluate(pool: Any, cand: Any, folder: Path,
             args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """Merge a candidate with mergekit and lm-eval it: (retention by task, seconds)."""
    from mergekit.options import MergeOptions

    from mergekit_collapse.evaluate.observed import evaluate_merge
    from mergekit_collapse.guard.config import parse_config
    from mergekit_collapse.merge import merge_config
    from mergekit_collapse.planner.space import candidate_raw

    t0 = time.perf_counter()
    raw = candidate_raw(pool, cand)
    folder.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(raw, sort_keys=False)
    (folder.parent / f"{folder.name}.yml").write_text(text)
    if not (folder / "config.json").is_file():
        merge_config(raw, folder, MergeOptions(lora_merge_cache=str(args.work / "lora_cache"),
                                               copy_tokenizer=True, quiet=True, lazy_unpickle=False,
                                               random_seed=0))
    ev = evaluate_merge(folder, parse_config(text, folder.parent / f"{folder.name}.yml"),
                        limit=args.limit, progress=False, dtype=args.eval_dtype)
    ret = {t.task: (t.merged / t.constituent if t.constituent else 1.0) for t in ev.tasks}
    return ret, time.perf_counter() - t0


def random_search(pool: Any, run: Any, n: int, seed: int, rule: str,
                  floor: float) -> tuple[Any, float]:
    """The best of `n` random grid candidates by the same rehearsal objective."""
    from mergekit_collapse.guard.assess import extraction_settings
    from mergekit_collapse.planner.search import Rehearser, expected_retention, objective
    from mergekit_collapse.planner.space import candidates

    t0 = time.perf_counter()
    cands, _ = candidates(pool, list(pool.space.methods))
    picks = random.Random(seed).sample(cands, min(n, len(cands)))
    reh = Rehearser(pool, run.probes, extraction_settings(pool.cfg, Runtime(dtype="float32")), None)
    best, best_v = None, float("-inf")
    for c in picks:
        s, tok, _ = reh(c)
        v = objective(s, pool.tasks, rule, floor, tok, expected_retention(s))
        if v > best_v:
            best, best_v = c, v
    return best, time.perf_counter() - t0


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
    from mergekit_collapse.planner.space import load_pool

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
                      "seconds": result.seconds}
    pool = load_pool(path)
    from mergekit_collapse.planner.space import Candidate

    f = result.finalists[0]
    pick = Candidate(tuple(pool.tasks.index(t) for t in f.tasks), f.method,
                     tuple(f.weights) if f.weights else None, f.density)
    ret, sec = evaluate(pool, pick, work / "merges" / "planner", args)
    row["planner"] |= {"observed": ret, "eval_seconds": round(sec, 1), "name": describe(pool, pick),
                       **score(ret, tasks)}
    run = run_guard(pool.cfg, runtime=Runtime(dtype="float32", progress=False), rehearse="off")
    rnd, rsec = random_search(pool, run, result.rehearsed, args.seed, args.objective,
                              check_floor(pool.space.floor))
    ret, sec = evaluate(pool, rnd, work / "merges" / "random", args)
    row["random"] = {"name": describe(pool, rnd), "seconds": round(rsec, 1), "observed": ret,
                     "eval_seconds": round(sec, 1), "load": load(), **score(ret, tasks)}
    pool_set = set(tasks)
    row["uniform"] = {m: score(measured[(m, frozenset(tasks))], tasks)
                      for m in ("linear", "task_arithmetic", "ties")
                      if (m, frozenset(tasks)) in measured}
    inside = [(k, score(v, tasks)) for k, v in measured.items() if k[1] <= pool_set]
    (m, group), best = max(inside, key=lambda kv: (kv[1]["mean"], kv[1]["kept"]))
    row["oracle"] = {"name": f"{m}: {'+'.join(sorted(group))}", "candidates": len(inside), **best}
    row["load_end"] = load()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| pool | strategy | merge | mean retention | kept (≥ 0.7) | "
           "wall s | load (1/5/15 min) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{len(r['pool'])}: " + "+".join(r["pool"])
        p = r["planner"]
        out.append(f"| {name} | **planner** ({p['rehearsed']} rehearsals) | {p['name']} | "
                   f"**{p['mean']:.3f}** | {p['kept']} | {r['planner_seconds']:.0f} | "
                   f"{r['planner_load']} |")
        q = r["random"]
        out.append(f"| | random search ({p['rehearsed']} rehearsals) | {q['name']} | "
                   f"{q['mean']:.3f} | {q['kept']} | {q['seconds']:.0f} | {q['load']} |")
        for m, s in r["uniform"].items():
            out.append(f"| | uniform all-in (records) | {m} | {s['mean']:.3f} | "
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
    p.add_argument("--pools", default=",".join(POOLS), help="comma-separated task sets (a+b+c)")
    p.add_argument("--methods", default="linear,task_arithmetic,ties")
    p.add_argument("--rehearsals", type=int, default=6)
    p.add_argument("--refine", type=int, default=2)
    p.add_argument("--objective", default="mean")
    p.add_argument("--limit", type=int, default=24, help="lm-eval documents per task")
    p.add_argument("--eval-dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "planner.json")
    p.add_argument("--fit-retention", action="store_true",
                   help="print the agreement -> retention table the planner ships, and exit")
    args = p.parse_args(argv)
    if args.fit_retention:
        print(fit_retention())
        return 0
    if not (args.zoo / "adapters").is_dir():
        from mergekit_collapse.demo.zoo import export_zoo

        export_zoo(args.zoo)
    measured = records()
    rows = []
    for i, pool in enumerate(args.pools.split(",")):
        rows.append(one_pool(args.zoo.resolve(), pool.split("+"), i, args, measured))
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
