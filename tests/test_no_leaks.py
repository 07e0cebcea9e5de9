"""Nothing leaks: with HF_TOKEN set, no command prints, logs, writes, raises or publishes the token.

Every command of the CLI runs in-process (click's CliRunner) on one tiny config, on its ordinary and
its failing paths, with and without --debug; `push` talks to the fake Hub (tests/hub_server.py).
Then stdout, stderr, the logs, exception texts and tracebacks, every file under tmp_path (outputs,
reports, cards, caches) and every file the Hub received are scanned for the token and its first 8
characters. What is published must also carry no absolute local path.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from common import calibration_csv, tiny_config
from hub_server import TOKEN, FakeHub

from mergekit_collapse.cli import COMMANDS, main
from mergekit_collapse.errors import CollapseError

NEEDLES = (TOKEN, TOKEN[:8])


def exit_code(res: Result) -> int:
    """The exit code; with --debug a CollapseError propagates, carrying its code."""
    return res.exception.exit_code if isinstance(res.exception, CollapseError) else res.exit_code


def texts_of(res: Result) -> list[str]:
    out = [res.stdout, res.stderr, str(res.exception or "")]
    if res.exc_info is not None and res.exception is not None:
        out.append("".join(traceback.format_exception(*res.exc_info)))
    return out


def test_the_token_never_leaks_from_any_command(
        hub: FakeHub, tiny_zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    import mergekit.scripts.run_yaml as run_yaml

    from mergekit_collapse.cli.mergekit_yaml import install_guard

    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "step_summary.md"))
    monkeypatch.setenv("GITHUB_OUTPUT", str(tmp_path / "github_output"))
    cfg = tiny_config(tmp_path, tiny_zoo, models=("ft1", "ft2"), rehearse="off")
    records = tmp_path / "records.csv"
    calibration_csv(records)
    out, ran = tmp_path / "merged", tmp_path / "ran"
    ok = ["--guard-absolute-budget", "1e9", "--quiet"]
    stop = ["--guard-absolute-budget", "1e-9", "--guard-action", "abort", "--quiet"]
    # (expected exit code, arguments); the guarded merge runs before card and push use its folder
    calls = [
        (0, ["validate", str(cfg)]),
        (0, ["schema", "report"]),
        (0, ["check", str(cfg), "--format", "json", "--out", str(tmp_path / "checked"),
             "--absolute-budget", "1e9"]),
        (0, ["check", str(cfg), "--format", "github", "--absolute-budget", "1e9"]),
        (3, ["--debug", "check", str(cfg), "--absolute-budget", "1e-9"]),
        (2, ["--debug", "check", str(tmp_path / "missing.yml")]),
        (0, ["merge", str(cfg), str(out), *ok]),
        (3, ["--debug", "merge", str(cfg), str(tmp_path / "stopped"), *stop]),
        (0, ["card", str(out)]),
        (0, ["push", str(out), "alice/merged", "--dry-run"]),
        (0, ["--debug", "push", str(out), "alice/merged"]),
        (4, ["push", str(out), "alice/merged"]),  # exists
        (4, ["--debug", "push", str(out), "bob/other"]),  # 403: debug re-raises the HubError
        (0, ["run", str(cfg), str(ran), "--no-eval", "--push", "alice/ran", *ok]),
        (3, ["--debug", "run", str(cfg), str(tmp_path / "ran-stopped"), "--no-eval", *stop]),
        (2, ["--debug", "evaluate", str(tmp_path / "nowhere"), str(cfg), "--limit", "1"]),
        (0, ["conflicts", str(cfg), "--format", "json", "--out", str(tmp_path / "conflicts.json")]),
        (0, ["stats", str(records), "--out", str(tmp_path / "stats.md")]),
        (2, ["--debug", "stats", str(tmp_path / "nope.csv")]),
        (0, ["calibrate", str(records), "--score", "x", "--out", str(tmp_path / "cal.json")]),
        (2, ["--debug", "calibrate", str(records), "--score", "zzz"]),
        (0, ["zoo", "list"]),
        (0, ["plan", str(cfg), "--max-rehearsals", "0", "--out", str(tmp_path / "plan")]),
        (2, ["--debug", "demo", "--out", str(tmp_path / "demo"), "--config",
             str(tmp_path / "no.yml")]),
    ]
    assert {args[args[0] == "--debug"] for _, args in calls} == set(COMMANDS)
    runner = CliRunner()
    texts: list[str] = []
    for code, args in calls:
        res = runner.invoke(main, args)
        assert exit_code(res) == code, (args, res.output, res.exception)
        texts += texts_of(res)
    install_guard(run_yaml)  # mergekit-yaml --guard: merged, then stopped
    for code, extra in ((0, ok), (3, stop)):
        res = runner.invoke(run_yaml.main, [str(cfg), str(tmp_path / f"yaml-{code}"), *extra])
        assert res.exit_code == code, res.output
        texts += texts_of(res)

    assert caplog.records  # the logs were really captured
    texts += [caplog.text, *capfd.readouterr()]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 50  # outputs, reports, cards, caches
    texts += [p.read_bytes().decode(errors="replace") for p in files]
    published = {f"{repo}/{name}": data for repo in ("alice/merged", "alice/ran")
                 for name, data in hub.files(repo).items()}
    assert any(name.endswith("README.md") for name in published)
    texts += [data.decode(errors="replace") for data in published.values()]
    assert [t[:200] for t in texts if any(n in t for n in NEEDLES)] == []
    # published: no absolute local path
    # (tests/publish/test_hub.py checks a hand-made folder; these are real)
    local = (str(tmp_path).encode(), str(tmp_path.resolve()).encode(),
             str(tiny_zoo["base"]).encode())
    assert [name for name, data in published.items() if any(p in data for p in local)] == []
