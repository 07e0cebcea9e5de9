"""The console: one progress display of our own, and third-party noise kept quiet unless asked.

`Progress` shows one stage (hidden states, rehearsal, evaluation) step by step: a tqdm bar on an
interactive terminal, and in a log (not a TTY) one plain line per finished step, never a redraw.
`quiet_third_party` silences the progress bars, warnings and log lines of the libraries we drive
(transformers, datasets, huggingface_hub, lm-eval, accelerate, mergekit, peft) through their own
switches; `set_verbose(True)` (the CLI's `--verbose`) lets them all through.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Progress", "is_verbose", "one_line", "quiet_third_party", "quiet_tqdm", "set_verbose"]

#: loggers of the libraries we drive, kept at ERROR unless verbose
NOISY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "lm_eval", "accelerate", "mergekit",
                 "peft")
#: (category, message regex) of warnings known to be noise for our users
KNOWN_WARNINGS = (
    (FutureWarning, r".*is_gradient_checkpointing.*"),  # transformers 5, raised inside peft
)

_verbose = False


def one_line(text: str) -> str:
    """`text` as one line: a CR or LF (in a file or folder name) shown as `\\r` / `\\n`, so it can
    neither split an error line nor start a line a CI log would read as a command."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def set_verbose(verbose: bool) -> None:
    """Let third-party progress bars, warnings and logs through (True), or keep them quiet."""
    global _verbose
    _verbose = verbose


def is_verbose() -> bool:
    return _verbose


def quiet_third_party(*libraries: str) -> None:
    """Silence known third-party noise, unless verbose.

    Logger levels and warning filters apply at once; each library's own switches (transformers'
    and datasets' verbosity and progress bars, huggingface_hub's progress bars) apply to those
    imported so far. tqdm bars drawn directly by lm-eval and mergekit obey `TQDM_DISABLE`, read
    when tqdm is first imported: the CLI sets it before any command runs (`quiet_tqdm`).

    Args:
        libraries: import these first (e.g. "transformers"), so that their switches apply too.
    """
    if _verbose:
        return
    for name in libraries:
        importlib.import_module(name)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils import logging as ds_logging

        ds_logging.set_verbosity_error()
        ds_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def quiet_tqdm() -> None:
    """Default every tqdm bar to off (tqdm reads `TQDM_DISABLE` at import; our bars pass their own
    `disable`). For the CLI, before any command imports tqdm; unless verbose or set by the user."""
    # imported already: too late, and not ours to set
    if not _verbose and "tqdm" not in sys.modules:
        os.environ.setdefault("TQDM_DISABLE", "1")


def interactive(stream: TextIO) -> bool:
    """Whether `stream` is a terminal a bar can redraw on."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


class Progress:
    """One stage's progress over `total` steps.

    On a terminal: a tqdm bar (description the stage, postfix the current step). Elsewhere: one
    plain line per finished step, e.g. `hidden states 2/5  zoo/smollm2+topic  1.4 s`.

    Args:
        stage: what the steps make up, e.g. "hidden states".
        total: the number of steps.
        enabled: False shows nothing.
        labels: display names by key (e.g. by model reference), for `label`.
        stream: where to write (default: sys.stderr at the time of writing).
    """

    def __init__(self, stage: str, total: int, *, enabled: bool = True,
                 labels: Mapping[str, str] | None = None, stream: TextIO | None = None):
        self.stage, self.total, self.count = stage, total, 0
        self.labels = dict(labels or {})
        self.enabled = enabled and total > 0
        self._stream = stream
        self._bar: Any = None
        if self.enabled and interactive(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=stage, unit="step", file=self.stream,
                             disable=False, dynamic_ncols=True)

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def label(self, key: str) -> str:
        """The display name of `key` (itself when it has none)."""
        return self.labels.get(key, key)

    def start(self, label: str) -> None:
        """Show that the step `label` is under way (on a terminal; a log gets the finished line)."""
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)

    def done(self, label: str, *, seconds: float | None = None, note: str = "") -> None:
        """Count one finished step."""
        if not self.enabled:
            return
        self.count += 1
        if self._bar is not None:
            self._bar.update(1)
            return
        parts = [f"{self.stage} {self.count}/{self.total}", label]
        if note:
            parts.append(note)
        if seconds is not None:
            parts.append(f"{seconds:.1f} s")
        print("  ".join(parts), file=self.stream, flush=True)

    @contextmanager
    def step(self, label: str, note: str = "") -> Iterator[None]:
        """Time one step: `start` now, `done` when the block finishes without an error."""
        self.start(label)
        t0 = time.perf_counter()
        yield
        self.done(label, seconds=time.perf_counter() - t0, note=note)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
