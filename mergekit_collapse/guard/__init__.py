"""The guard: config -> probes -> hidden states (extract) -> geometry -> weights -> calibration
-> decision -> report, plus the label-free rehearsal. `assess` ties them together.

Importing this package is cheap; `check` and `run_guard` load torch on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergekit_collapse.guard.assess import check, run_guard

__all__ = ["check", "run_guard"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mergekit_collapse.guard import assess

        return getattr(assess, name)
    raise AttributeError(name)
