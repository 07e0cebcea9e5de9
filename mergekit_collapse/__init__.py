"""mergekit-collapse: a pre-merge mergeability guard for MergeKit.

    >>> from mergekit_collapse import check
    >>> report = check("merge_configs/demo.yml")
    >>> report.verdict

The public API: `check` (the guard on one config), `run_pipeline` (guard -> merge -> evaluate ->
card -> push), `plan` (the best config of a pool of fine-tunes, without labels), `GuardReport`,
`push`, `Runtime` (device, dtype, cache, ...: how each of them runs), and the errors. The stages
live in sub-packages named for them: guard/, actions/, merge, evaluate/, publish/, pipeline, with
analysis/, ci/, demo/ and cli/ beside them (README, "Layout").
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from mergekit_collapse._version import __version__
from mergekit_collapse.errors import (
    BadInputError,
    CollapseError,
    ConfigError,
    GuardStoppedError,
    HubError,
    ModelNotFoundError,
)

if TYPE_CHECKING:
    from mergekit_collapse.guard.assess import check
    from mergekit_collapse.guard.report import GuardReport
    from mergekit_collapse.pipeline import run_pipeline
    from mergekit_collapse.planner.api import plan
    from mergekit_collapse.publish.hub import push
    from mergekit_collapse.runtime import Runtime

#: lazy: `import mergekit_collapse` must not import torch
_LAZY = {
    "check": "mergekit_collapse.guard.assess",
    "run_pipeline": "mergekit_collapse.pipeline",
    "GuardReport": "mergekit_collapse.guard.report",
    "push": "mergekit_collapse.publish.hub",
    "plan": "mergekit_collapse.planner.api",
    "Runtime": "mergekit_collapse.runtime",
}

__all__ = ["BadInputError", "CollapseError", "ConfigError", "GuardReport", "GuardStoppedError",
           "HubError", "ModelNotFoundError", "Runtime", "__version__", "check", "plan", "push",
           "run_pipeline"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(name)
