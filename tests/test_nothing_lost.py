"""Nothing lost or half-written: interrupted merges, re-runs, stops, symlinks, corrupt cache
entries.

Real tiny models and real mergekit; a Ctrl-C is injected into mergekit's own write path.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from common import tiny_config

from mergekit_collapse.cli import main
from mergekit_collapse.errors import BadInputError
from mergekit_collapse.publish.hub import plan_files

MERGE = ["--guard-absolute-budget", "1e9", "--quiet"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def leftovers(parent: Path, out: Path) -> list[str]:
    """Temporary or set-aside folders next to OUT."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Ctrl-C from inside mergekit's tensor writer, after n tensors were saved."""
    from mergekit.io.tensor_writer import TensorWriter

    original, calls = TensorWriter.save_tensor, []

    def save_tensor(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TensorWriter, "save_tensor", save_tensor)


@pytest.fixture
def cfg(tiny_zoo, tmp_path: Path) -> Path:
    return tiny_config(tmp_path, tiny_zoo, models=("ft1", "ft2"), rehearse="off")


def test_ctrl_c_during_a_merge_leaves_no_output_folder(cfg: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 6)
    res = CliRunner().invoke(main, ["merge", str(cfg), str(out), *MERGE, "--out-shard-size", "1K"])
    assert res.exit_code == 130, res.output
    assert not out.exists()
    assert leftovers(tmp_path, out) == []


def test_rerun_replaces_a_previous_merge_whole_and_ctrl_c_leaves_it_as_it_was(
        cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(main, ["merge", str(cfg), str(out), *MERGE, "--out-shard-size", "1K"])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("*.safetensors"))) > 3
    before = snapshot(out)

    with monkeypatch.context() as m:  # interrupted re-run: OUT as it was
        interrupt_after(m, 3)
        res = runner.invoke(main, ["merge", str(cfg), str(out), *MERGE])
        assert res.exit_code == 130, res.output
    assert snapshot(out) == before
    assert leftovers(tmp_path, out) == []

    res = runner.invoke(main, ["merge", str(cfg), str(out), *MERGE])  # one shard now: none stale
    assert res.exit_code == 0, res.output
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == ["model.safetensors"]
    assert ((out / "mergekit_config.yml").exists()
            and (out / "mergeability" / "report.json").exists())
    assert leftovers(tmp_path, out) == []
    res = runner.invoke(main, ["push", str(out), "alice/m", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "model-0" not in res.output and "model.safetensors" in res.output


def test_a_folder_that_is_not_a_merge_is_never_replaced(cfg: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    res = CliRunner().invoke(main, ["merge", str(cfg), str(out), *MERGE])
    assert res.exit_code == 2, res.output
    assert "not a merged model folder" in res.output and len(res.stderr.strip().splitlines()) == 1
    assert snapshot(out) == {"thesis.tex": b"years of work"}


def test_mergekit_yaml_guard_that_stops_leaves_out_as_it_was(tiny_zoo, tmp_path: Path) -> None:
    import mergekit.scripts.run_yaml as run_yaml

    from mergekit_collapse.cli.mergekit_yaml import install_guard

    install_guard(run_yaml)
    cfg = tiny_config(tmp_path, tiny_zoo, models=("ft1", "ft2"), rehearse="off", action="abort")
    out = tmp_path / "out"
    (out / "mergeability").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"old weights")
    (out / "mergeability" / "report.json").write_text("{}")
    before = snapshot(out)
    res = CliRunner().invoke(run_yaml.main, [str(cfg), str(out), "--guard-absolute-budget", "1e-9"])
    assert res.exit_code == 3, res.output
    assert snapshot(out) == before and leftovers(tmp_path, out) == []


def test_push_refuses_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "inside.json").symlink_to(out / "config.json")  # inside OUT: fine
    assert [pf.path_in_repo for _, pf in plan_files(out)] == ["config.json", "inside.json"]
    secret = tmp_path / "hostname"
    secret.write_text("my-machine\n")
    (out / "leak.txt").symlink_to(secret)
    with pytest.raises(BadInputError, match="push leak.txt: it is a symlink to outside") as info:
        plan_files(out)
    assert "\n" not in str(info.value)
    res = CliRunner().invoke(main, ["push", str(out), "alice/m", "--dry-run"])
    assert res.exit_code == 2 and "leak.txt" in res.stderr and "my-machine" not in res.output
    (out / "leak.txt").unlink()
    (out / "linked").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(BadInputError, match="push linked: it is a symlink to outside"):
        plan_files(out)


def test_a_corrupt_cache_entry_is_recomputed_with_a_warning(
        cfg: Path, tmp_path: Path, _isolated_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner = CliRunner()
    args = ["check", str(cfg), "--format", "json", "--absolute-budget", "1e9"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    entries = sorted((_isolated_cache / "hidden_states").rglob("*.npz"))
    assert len(entries) >= 2
    entries[0].write_bytes(b"")  # empty
    entries[1].write_bytes(entries[1].read_bytes()[:-40])  # truncated
    (_isolated_cache / "file_hashes.json").write_text("null")
    caplog.set_level(logging.WARNING)
    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "file_hashes.json" in warned and "recomputing" in warned
    assert json.loads(second.stdout)["bounds"] == pytest.approx(json.loads(first.stdout)["bounds"])
    for entry in entries[:2]:  # rewritten whole
        with np.load(entry) as z:
            assert len(z["keys"]) == len(z["vectors"]) > 0
    assert isinstance(json.loads((_isolated_cache / "file_hashes.json").read_text()), dict)


def test_ctrl_c_mid_extraction_keeps_what_was_computed_and_nothing_half_written(
        cfg: Path, tmp_path: Path, _isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_collapse._io import read_npz
    from mergekit_collapse.guard import extract

    original, calls, armed = extract.run_forward, [], [True]

    def forward(*args, **kwargs):
        calls.append(1)
        if armed[0] and len(calls) == 2:  # the second model
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    args = ["check", str(cfg), "--format", "json", "--absolute-budget", "1e9", "--no-progress"]
    monkeypatch.setattr(extract, "run_forward", forward)
    stopped = CliRunner().invoke(main, args)
    assert stopped.exit_code == 130 and "interrupted" in stopped.stderr
    entries = sorted(e for e in (_isolated_cache / "hidden_states").rglob("*")
                     if e.is_file() and e.name != ".lock")
    assert entries and all(e.suffix == ".npz" and read_npz(e) is not None
                           for e in entries)  # whole entries, no temporary files
    calls.clear()
    armed[0] = False
    resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code == 0, resumed.output
    assert len(calls) == 2  # base, ft1, ft2: the first model came from the cache
    monkeypatch.setenv("MERGEKIT_COLLAPSE_CACHE", str(tmp_path / "fresh"))
    clean = CliRunner().invoke(main, args)
    assert json.loads(resumed.stdout)["bounds"] == json.loads(clean.stdout)["bounds"]


def test_a_flipped_byte_in_a_cache_entry_is_caught_by_its_checksum(
        cfg: Path, _isolated_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mergekit_collapse._io import read_npz

    runner = CliRunner()
    args = ["check", str(cfg), "--format", "json", "--absolute-budget", "1e9"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    entry = sorted((_isolated_cache / "hidden_states").rglob("*.npz"))[0]
    data = bytearray(entry.read_bytes())
    with np.load(entry) as z:  # flip a byte inside the vectors' data
        vectors = z["vectors"]
    at = bytes(data).find(vectors.tobytes()[:16])
    assert at > 0
    data[at + 3] ^= 0xFF
    entry.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING)
    assert read_npz(entry) is None and "recomputing" in caplog.text
    second = runner.invoke(main, args)
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["bounds"] == pytest.approx(json.loads(first.stdout)["bounds"])


def test_atomic_writes_leave_no_temporary_file_on_failure(tmp_path: Path) -> None:
    from mergekit_collapse._io import atomic_write_bytes

    target = tmp_path / "a" / "entry.json"
    atomic_write_bytes(target, b"{}")

    with pytest.raises(TypeError):  # fails after the temporary file was opened
        atomic_write_bytes(target, None)  # type: ignore[arg-type]
    assert os.listdir(target.parent) == ["entry.json"] and target.read_bytes() == b"{}"
