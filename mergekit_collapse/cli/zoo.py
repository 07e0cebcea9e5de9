"""`mergekit-collapse zoo ...`: the real, offline model zoos (SmolLM2-135M-Instruct or Gemma 3 270M
+ task LoRAs)."""

from __future__ import annotations

from pathlib import Path

import click

family_option = click.option(
    "--family", type=click.Choice(["smollm2", "gemma3"]), default="smollm2", show_default=True,
    help="The zoo: SmolLM2-135M-Instruct (the demo's) or Gemma 3 270M (the second family).")


@click.group("zoo")
def zoo() -> None:
    """The offline model zoos: a base model and one LoRA adapter per synthetic task."""


@zoo.command("list")
@family_option
def list_tasks(family: str) -> None:
    """List the zoo's tasks, their lm-eval names and whether an adapter is shipped."""
    from mergekit_collapse.demo.zoo import ADAPTER_DIRS, FAMILY_TASKS, eval_name
    from mergekit_collapse.demo.zoo.tasks import TASKS_DEF

    for task in FAMILY_TASKS[family]:
        adapter = ADAPTER_DIRS[family] / task / "adapter_model.safetensors"
        have = "adapter" if adapter.is_file() else "-"
        click.echo(f"{task:16} {eval_name(task):20} {TASKS_DEF[task].kind:9} {have}")


@zoo.command("export")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--task", "tasks", multiple=True, help="Export only this task (repeatable).")
@family_option
def export(out_dir: Path, tasks: tuple[str, ...], family: str) -> None:
    """Write OUT_DIR/<family>, OUT_DIR/adapters/<task> and OUT_DIR/tasks (data + lm-eval YAMLs)."""
    from mergekit_collapse.demo.zoo import export_zoo

    out = export_zoo(out_dir, tasks=list(tasks) or None, family=family)
    click.echo(f"exported the zoo to {out} (lm-eval tasks: --include_path {out / 'tasks'})")


@zoo.command("train")
@click.argument("tasks", nargs=-1)
@family_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Adapter root (default: the package's adapter folder of the family).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=120, show_default=True)
@click.option("--target", type=click.FloatRange(0, 1), default=0.97, show_default=True,
              help="Stop once greedy exact match on the validation slice reaches this.")
def train(tasks: tuple[str, ...], family: str, out: Path | None, seed: int, max_steps: int,
          target: float) -> None:
    """Train one LoRA per task (all the family's tasks if none given) on CPU, seeded."""
    from mergekit_collapse.demo.base_model import ensure_base
    from mergekit_collapse.demo.base_model import family as base_family
    from mergekit_collapse.demo.zoo import ADAPTER_DIRS, FAMILY_TASKS
    from mergekit_collapse.demo.zoo.train import TrainSettings, train_adapter

    spec = base_family(family)
    base = ensure_base(spec)
    root = out or ADAPTER_DIRS[family]
    settings = TrainSettings.for_family(family, seed=seed, max_steps=max_steps, target=target)
    for task in tasks or FAMILY_TASKS[family]:
        res = train_adapter(task, base, root / task, settings=settings, hub_id=spec.hub_id,
                            log=lambda m: click.echo(m, err=True))
        click.echo(f"{task}: {res.steps} steps, validation exact match {res.val_exact_match:.3f}, "
                   f"{res.seconds:.0f}s -> {root / task}")


@zoo.command("score")
@click.argument("tasks", nargs=-1)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="lm-eval documents per task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Read/write the scores JSON here (default: the package's zoo/scores.json).")
@click.option("--base-only", is_flag=True, help="Score only the base model.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads.")
@family_option
def score(tasks: tuple[str, ...], limit: int, batch_size: int, out: Path | None, base_only: bool,
          threads: int | None, family: str) -> None:
    """Score each adapter on its own task and the base model on every task, with lm-eval.

    Scores already recorded under the same --limit are kept (the base is not re-run).
    """
    from mergekit_collapse.demo.zoo import FAMILY_TASKS, SCORES_FILES
    from mergekit_collapse.demo.zoo.scores import metric_of, score_zoo

    names = list(tasks) or list(FAMILY_TASKS[family])
    res = score_zoo(names, limit=limit, batch_size=batch_size, family=family,
                    out_file=out or SCORES_FILES[family], adapters=not base_only, threads=threads,
                    log=lambda m: click.echo(m, err=True))
    click.echo(f"{'task':16} {'metric':12} {'base':>6} {'adapter':>8}")
    for task in names:
        own = res["tasks"].get(task, {}).get("adapter")
        shown = f"{own:8.3f}" if own is not None else f"{'-':>8}"
        click.echo(f"{task:16} {metric_of(task):12} {res['base'][task]:6.3f} {shown}")
