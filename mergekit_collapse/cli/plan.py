"""`mergekit-collapse plan POOL.yml`: the best mergekit config of a pool of fine-tunes, no
labels."""

from __future__ import annotations

from typing import Any

import click

from mergekit_collapse.cli.options import options, runtime_options, runtime_specs


@click.command("plan")
@click.argument("pool", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write plan.yml (the chosen config), plan.json and plan.md here.")
@click.option("--objective", type=click.Choice(["kept", "mean", "worst"]), default=None,
              help="kept: most tasks above the floor; mean: best mean retention; worst: best worst "
                   "task (default: guard.plan.objective, else kept).")
@click.option("--floor", type=float, default=None,
              help="Retention a task must exceed to count as kept (default: the calibrated "
                   "rehearsal collapse edge).")
@click.option("--max-rehearsals", type=click.IntRange(min=0), default=None,
              help="Most candidates rehearsed, refinement included (0: the geometry alone).")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=None,
              help="Time budget: no rehearsal starts after this many seconds (default: "
                   "guard.plan.seconds, else none).")
@click.option("--refine", type=click.IntRange(min=0), default=None,
              help="Rehearsals spent refining the best candidate's weights (optuna TPE).")
@click.option("--confirm", type=click.IntRange(min=0), default=None,
              help="Rehearse the N best merges again on a second sample of probes, rank them on "
                   "both (default: guard.plan.confirm, else 3; 0: off).")
@click.option("--methods", default=None,
              help="Comma-separated merge methods to try (default: guard.plan.methods, else those "
                   "mergekit accepts for the pool among linear, task_arithmetic, ties, dare_ties, "
                   "della, breadcrumbs, model_stock, sce, karcher).")
@click.option("--verify", type=click.IntRange(min=0), default=0, show_default=True,
              help="Merge and lm-eval the top N finalists: predicted vs observed.")
@click.option("--verify-limit", type=click.IntRange(min=1), default=24, show_default=True,
              help="lm-eval documents per task for --verify.")
@options(runtime_specs("device", "dtype", "cache_dir", "no_progress"))
def plan(pool: str, out_dir: str | None, objective: str | None, floor: float | None,
         max_rehearsals: int | None, max_seconds: float | None, refine: int | None,
         confirm: int | None, methods: str | None, verify: int,
         verify_limit: int, **params: Any) -> None:
    """Search POOL's subsets, methods and weights for the config predicted to keep the most tasks.

    The geometry screens every candidate, the rehearsal judges the most promising, optuna refines
    the best one's weights. Exit 0 with a plan; 2 on bad input.
    """
    from tabulate import tabulate

    from mergekit_collapse.planner.api import plan as run_plan

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    result = run_plan(pool, out=out_dir, objective=objective, floor=floor,
                      max_rehearsals=max_rehearsals, max_seconds=max_seconds, refine=refine,
                      confirm=confirm, methods=names, verify=verify,
                      verify_limit=verify_limit, runtime=runtime_options(params).runtime())
    rows = []
    for f in result.finalists[:10]:
        rows.append([f.rank, f.method, ",".join(f.tasks),
                     "/".join(f"{x:g}" for x in f.weights) if f.weights else "—",
                     " ".join(f"{f.rehearsal[t]:.2f}" for t in f.tasks) if f.rehearsal else "—",
                     " ".join(f"{f.expected_retention[t]:.2f}" for t in f.tasks),
                     " ".join(f"{f.observed[t]:.2f}" for t in f.tasks) if f.observed else "—",
                     f"{f.objective:.3f}"])
    click.echo(tabulate(rows, headers=["rank", "method", "tasks", "weights", "agreement",
                                       "predicted retention", "observed", "objective"]))
    s = result.summary
    click.echo(f"chosen: {result.finalists[0].method} of {', '.join(result.finalists[0].tasks)}"
               + (f"; keep apart: {', '.join(result.kept_apart)}" if result.kept_apart else ""))
    for f in result.further:
        click.echo(f"then: {f.finalist.method} of {', '.join(f.finalist.tasks)} ({f.file}; "
                   f"{f.summary.why})")
    click.echo(f"why: {s.why}")
    click.echo(f"cost: screened {s.screened}, rehearsed {s.rehearsed}, "
               + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    if result.labelled_search_seconds is not None:
        click.echo(f"a merge-and-evaluate search: {result.labelled_search_seconds:.0f} s "
                   f"({result.labelled_search_basis})")
    if out_dir:
        more = "".join(f", {f.file}" for f in result.further)
        click.echo(f"wrote {out_dir}/plan.yml{more}, plan.json, plan.md", err=True)
