"""mergekit-collapse: a pre-merge mergeability guard for MergeKit.

    >>> from mergekit_collapse import check
    >>> report = check("merge_configs/demo.yml")
    >>> report.verdict
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("mergekit-collapse")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

if TYPE_CHECKING:
    from mergekit_collapse.guard.assess import check

__all__ = ["__version__", "check"]


def __getattr__(name: str) -> Any:
    # lazy: `import mergekit_collapse` must not import torch
    if name == "check":
        from mergekit_collapse.guard.assess import check

        return check
    raise AttributeError(name)
