"""The installed distribution's version, in a module of its own: it imports nothing of ours."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergekit-collapse")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
