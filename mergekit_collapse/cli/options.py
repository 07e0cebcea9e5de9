"""Click options shared by the commands that run the guard (check, merge, demo...)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

GUARD_OPTIONS = [
    click.option("--budget", type=float, default=None,
                 help="Relative distortion budget (× the base model's probe spread)."),
    click.option("--absolute-budget", type=float, default=None,
                 help="Absolute budget, in squared hidden-state units."),
    click.option("--device", default="auto", show_default=True,
                 help="auto (accelerate over GPUs, else CPU), cpu, cuda, cuda:1, ..."),
    click.option("--dtype", default="auto", show_default=True,
                 help="auto (bfloat16; float32 for exactness), float32, bfloat16, float16."),
    click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                 help="Hidden-state cache (default $MERGEKIT_COLLAPSE_CACHE)."),
    click.option("--layer", type=int, default=None, help="Hidden layer (-1 = final norm output)."),
    click.option("--pooling", type=click.Choice(["mean", "last"]), default=None),
    click.option("--k", "k", type=int, default=None, help="Probes per task."),
    click.option("--seed", type=int, default=None, help="Probe sampling seed."),
    click.option("--jung-dim", type=click.Choice(["affine", "hidden"]), default=None),
    click.option("--rehearse", type=click.Choice(["auto", "on", "off"]), default=None,
                 help="Merge in memory and compare answers on the probes (default guard.rehearse: "
                      "auto, when the inputs weigh at most guard.rehearse_max_gb)."),
    click.option("--base", "base", default=None,
                 help="The common base model (risk-score anchor) when the config names none."),
    click.option("--allow-pickle", is_flag=True, help="Allow .bin/.pt weights (unsafe)."),
    click.option("--trust-remote-code", is_flag=True, help="Allow custom model code."),
    click.option("--no-progress", is_flag=True, help="No progress bars."),
]


def guard_options(f: Callable) -> Callable:
    """Decorate a command with every guard option."""
    for option in reversed(GUARD_OPTIONS):
        f = option(f)
    return f


def guard_kwargs(params: dict) -> dict:
    """Map the options' values onto `guard.run_guard` keyword arguments."""
    keys = ["budget", "absolute_budget", "device", "dtype", "cache_dir", "layer", "pooling", "k",
            "seed", "jung_dim", "rehearse", "base", "allow_pickle", "trust_remote_code"]
    out = {k: params[k] for k in keys if k in params}
    out["progress"] = not params.get("no_progress", False)
    return out


def emit(text: str, out: Path | None) -> None:
    """Print `text`, or write it to `out` (parents created) and say where."""
    if out is None:
        click.echo(text, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    click.echo(f"wrote {out}")
