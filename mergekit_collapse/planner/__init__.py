"""The merge planner: from a pool of fine-tunes to the mergekit config predicted to keep the most
of their tasks, found without labels (`space`: pool, candidates, geometry screen; `search`: screen,
rehearse, refine; `api`: `plan()` and its outputs)."""

from __future__ import annotations

from typing import Any

__all__ = ["plan"]


def __getattr__(name: str) -> Any:
    if name == "plan":
        from mergekit_collapse.planner.api import plan

        return plan
    raise AttributeError(name)
