"""The console: our progress display (a bar on a terminal, plain lines in a log) and third-party
output kept quiet unless `--verbose`, on a real check run of tiny models."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergekit_collapse._console import Progress

PROBES = ["alpha beta", "gamma delta epsilon", "zeta eta", "one two three"]
#: every line our own progress writes in a log
OURS = re.compile(r"^(hidden states|rehearsal) \d+/\d+  \S")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_in_a_log_writes_one_plain_line_per_finished_step():
    log = io.StringIO()
    with Progress("hidden states", 3, stream=log, labels={"/abs/zoo/ft1": "ft1"}) as bar:
        with bar.step(bar.label("/abs/zoo/ft1"), note="4 probes"):
            pass
        bar.start("base")  # under way: nothing written until it is done
        assert log.getvalue().count("\n") == 1
        bar.done("base", note="cached")
        with pytest.raises(RuntimeError), bar.step("broken"):
            raise RuntimeError  # a failed step is not reported as finished
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[0].startswith("hidden states 1/3  ft1  4 probes  ") and lines[0].endswith(" s")
    assert lines[1] == "hidden states 2/3  base  cached"
    assert len(lines) == 2


def test_progress_on_a_terminal_draws_one_bar_and_nothing_when_disabled():
    tty = Terminal()
    with Progress("rehearsal", 2, stream=tty) as bar:
        for label in ("ft1", "ft2"):
            with bar.step(label):
                pass
    assert "\r" in tty.getvalue() and "rehearsal" in tty.getvalue() and "2/2" in tty.getvalue()
    quiet = Terminal()
    with Progress("rehearsal", 2, stream=quiet, enabled=False) as bar:
        bar.done("ft1")
    assert quiet.getvalue() == ""


@pytest.fixture
def lora_config(tiny_zoo, tmp_path):
    """A guarded config over a full fine-tune and a LoRA (peft loading is where transformers
    warns)."""
    refs = [str(tiny_zoo["ft1"]), f"{tiny_zoo['base']}+{tiny_zoo['lora1']}"]
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
           "dtype": "float32",
           "models": [{"model": r, "parameters": {"weight": 0.5}} for r in refs],
           "guard": {"k": 2, "tasks": {r: {"name": name, "probes": PROBES[2 * i: 2 * i + 2]}
                                       for i, (r, name) in enumerate(zip(refs, ["ft", "lora"],
                                                                         strict=True))}}}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (tqdm reads its switches on first import), stderr a pipe: a
    log."""
    return subprocess.run([sys.executable, "-m", "mergekit_collapse", *args], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "MERGEKIT_COLLAPSE_CACHE": str(cache)})


def test_a_check_run_logs_our_progress_only_and_verbose_lets_third_parties_through(lora_config,
                                                                                  tmp_path):
    quiet = run_cli("check", str(lora_config), "--absolute-budget", "1e9", cache=tmp_path / "a")
    assert quiet.returncode == 0, quiet.stderr
    assert "\r" not in quiet.stderr
    lines = quiet.stderr.splitlines()
    assert lines and all(OURS.match(line) for line in lines), quiet.stderr
    # one line per finished step: the base and both constituents, then the rehearsal's three steps
    # (each constituent's answers, cached by the load that computed its hidden states; the merge)
    assert [line.split("  ")[0] for line in lines] == [
        "hidden states 1/3", "hidden states 2/3", "hidden states 3/3",
        "rehearsal 1/3", "rehearsal 2/3", "rehearsal 3/3"]
    assert [line.split("  ")[2] for line in lines[3:5]] == ["cached", "cached"]
    assert any("  base+lora1  " in line for line in lines)  # display names, not paths
    assert str(lora_config.parent.parent) not in quiet.stderr

    # a fresh cache: every model is loaded again
    loud = run_cli("--verbose", "check", str(lora_config), "--absolute-budget", "1e9",
                   cache=tmp_path / "b")
    assert loud.returncode == 0, loud.stderr
    # transformers' deprecation warning (raised while peft loads the LoRA) and mergekit's own log
    assert "is_gradient_checkpointing" in loud.stderr and "Base model specified" in loud.stderr
    assert "hidden states 3/3" in loud.stderr  # ours still there
