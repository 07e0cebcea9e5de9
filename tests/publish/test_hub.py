"""`push` with the REAL huggingface_hub client against an in-memory Hub (tests/hub_server.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hub_server import TOKEN, FakeHub
from reports import make_merged_dir

from mergekit_collapse.cli import main
from mergekit_collapse.errors import EXIT_HUB, HubError
from mergekit_collapse.publish.card import write_card
from mergekit_collapse.publish.hub import push

REPO = "alice/merged-model"


@pytest.fixture
def merged(tmp_path: Path) -> Path:
    out = make_merged_dir(tmp_path)
    write_card(out)
    return out


def local_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def calls(server: FakeHub, fragment: str, method: str | None = None) -> list[tuple[str, str, bool]]:
    return [r for r in server.requests if fragment in r[1] and (method is None or r[0] == method)]


def state(server: FakeHub, repo_id: str) -> tuple[dict[str, str], dict[str, bytes]]:
    return dict(server.repos[repo_id].branches), server.files(repo_id)


def test_push_then_download_round_trip(hub: FakeHub, merged: Path, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    result = push(merged, REPO, token=TOKEN)

    local = local_files(merged)
    # the report names a local checkpoint: the Hub gets its display name, not the path
    assert b"/local/ckpt" in local["mergeability/report.json"]
    local["mergeability/report.json"] = local["mergeability/report.json"].replace(
        b'"/local/ckpt/llama-code"', b'"llama-code"')
    assert hub.files(REPO) == {**local, ".gitattributes": hub.files(REPO)[".gitattributes"]}
    assert len(calls(hub, "/commit/", "POST")) == 1  # one commit, all files
    assert HfApi(endpoint=hub.url).model_info(REPO, token=TOKEN).sha == result.commit_oid
    assert result.commit_url and result.commit_oid in result.commit_url and result.created_repo
    for name in ("README.md", "config.json", "model-00001-of-00002.safetensors",
                 "mergeability/report.json", "mergeability/hidden_sim.png"):
        got = hf_hub_download(REPO, name, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "dl")
        assert Path(got).read_bytes() == local[name], name
    card = ModelCard.load(hf_hub_download(REPO, "README.md", endpoint=hub.url,
                                          cache_dir=tmp_path / "dl2"))
    assert card.data.mergeability["verdict"] == "mergeable"
    # binary files went through LFS; text files were committed inline
    lfs = {f.path_in_repo for f in result.files if f.lfs}
    assert {"model-00001-of-00002.safetensors", "mergeability/hidden_sim.png"} <= lfs
    assert "config.json" not in lfs and "README.md" not in lfs
    stored = hub.repos[REPO].snapshot()
    assert {p for p, f in stored.items() if f.lfs} == lfs


def test_large_file_goes_through_the_lfs_batch_upload_verify_path(hub: FakeHub,
                                                                  tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download

    # the Hub decides at pre-upload; a low threshold keeps the test small
    hub.lfs_threshold = 64 * 1024
    out = make_merged_dir(tmp_path, evaluation=False, lfs_size=200_000)
    big_text = ('{"vocab": "' + "x" * 100_000 + '"}').encode()  # text, but above the threshold
    (out / "tokenizer.json").write_bytes(big_text)

    result = push(out, REPO, token=TOKEN)

    modes = {f.path_in_repo: f.lfs for f in result.files}
    assert modes["tokenizer.json"] and modes["model-00002-of-00002.safetensors"]
    assert not modes["config.json"]
    uploads = calls(hub, "/lfs-upload/", "PUT")
    assert len(uploads) == sum(modes.values())  # one PUT per LFS object
    assert not any(auth for _, _, auth in uploads)  # the "S3" URL never gets the token
    assert calls(hub, "/info/lfs/objects/batch") and calls(hub, "/info/lfs/objects/verify")
    stored = hub.repos[REPO].snapshot()
    assert stored["tokenizer.json"].lfs and not stored["config.json"].lfs
    for name in ("tokenizer.json", "model-00002-of-00002.safetensors"):
        got = hf_hub_download(REPO, name, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "dl")
        assert Path(got).read_bytes() == (out / name).read_bytes()

    # pushing the same content again uploads no LFS object twice
    n_puts = len(uploads)
    push(out, REPO, token=TOKEN, exist_ok=True)
    assert len(calls(hub, "/lfs-upload/", "PUT")) == n_puts


def test_existing_repo_is_refused_without_exist_ok(hub: FakeHub, merged: Path) -> None:
    hub.create(REPO)
    before = state(hub, REPO)
    with pytest.raises(HubError, match="already exists"):
        push(merged, REPO, token=TOKEN)
    assert state(hub, REPO) == before
    assert not calls(hub, "/preupload/") and not calls(hub, "/commit/")

    result = push(merged, REPO, token=TOKEN, exist_ok=True)
    assert not result.created_repo
    assert hub.files(REPO)["config.json"] == (merged / "config.json").read_bytes()


@pytest.mark.parametrize("status", [401, 500, 503])
def test_failure_mid_commit_leaves_the_repo_unchanged(hub: FakeHub, merged: Path,
                                                      status: int) -> None:
    hub.create(REPO)
    push(merged, REPO, token=TOKEN, exist_ok=True)
    (merged / "config.json").write_text('{"changed": true}')
    (merged / "new_shard.safetensors").write_bytes(os.urandom(4096))
    before = state(hub, REPO)

    hub.faults["commit"] = status
    with pytest.raises(HubError) as info:
        push(merged, REPO, token=TOKEN, exist_ok=True)
    msg = str(info.value)
    assert "\n" not in msg and REPO in msg and f"HTTP {status}" in msg and TOKEN not in msg
    assert state(hub, REPO) == before  # no half-push: the new shard was uploaded, never committed

    hub.faults.clear()
    push(merged, REPO, token=TOKEN, exist_ok=True)
    assert hub.files(REPO)["config.json"] == b'{"changed": true}'


def test_failed_push_removes_the_repo_it_just_created(hub: FakeHub, merged: Path) -> None:
    hub.faults["commit"] = 502
    with pytest.raises(HubError, match="HTTP 502"):
        push(merged, REPO, token=TOKEN)
    assert REPO not in hub.repos
    hub.faults.clear()
    push(merged, REPO, token=TOKEN)  # so a retry needs no --exist-ok
    assert REPO in hub.repos


def test_auth_errors_are_one_line_hub_errors(hub: FakeHub, merged: Path) -> None:
    with pytest.raises(HubError, match="no Hub token"):
        push(merged, REPO)
    assert hub.requests == []  # refused before contacting anything
    with pytest.raises(HubError, match="HTTP 401"):
        push(merged, REPO, token="hf_notAValidToken")
    with pytest.raises(HubError, match="HTTP 403") as info:
        push(merged, "bob/theirs", token=TOKEN)
    assert "bob/theirs" in str(info.value)
    assert not calls(hub, "/commit/")


def test_hub_errors_carry_the_status_and_the_repo_id(hub: FakeHub, merged: Path) -> None:
    def failure(repo_id: str, **kwargs) -> HubError:
        with pytest.raises(HubError) as info:
            push(merged, repo_id, **kwargs)
        assert TOKEN not in f"{info.value} {info.value!r} {vars(info.value)}"
        return info.value

    no_token = failure(REPO)
    assert (no_token.status, no_token.repo_id) == (None, REPO)
    rejected = failure(REPO, token="hf_notAValidToken")
    assert (rejected.status, rejected.repo_id) == (401, REPO)
    forbidden = failure("bob/theirs", token=TOKEN)
    assert (forbidden.status, forbidden.repo_id) == (403, "bob/theirs")
    hub.create(REPO)
    exists = failure(REPO, token=TOKEN)
    assert (exists.status, exists.repo_id) == (409, REPO)
    missing = failure(REPO, token=TOKEN, exist_ok=True, create_pr=True, revision="no-such-branch")
    assert (missing.status, missing.repo_id) == (404, REPO)
    hub.faults["commit"] = 503
    assert failure(REPO, token=TOKEN, exist_ok=True).status == 503


def test_network_error_is_a_hub_error(hub: FakeHub, merged: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(HubError, match="cannot reach") as info:
        push(merged, REPO, token=TOKEN, endpoint=dead)
    assert TOKEN not in str(info.value)
    assert (info.value.status, info.value.repo_id) == (None, REPO)  # no HTTP answer, no status


def test_dry_run_contacts_nothing(hub: FakeHub, merged: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any request would now raise
    result = push(merged, REPO, dry_run=True)
    assert hub.requests == [] and REPO not in hub.repos
    plan = {f.path_in_repo: f for f in result.files}
    assert set(plan) == set(local_files(merged))
    assert plan["model-00001-of-00002.safetensors"].lfs and plan["mergeability/hidden_sim.png"].lfs
    assert not plan["config.json"].lfs and not plan["README.md"].lfs
    assert plan["config.json"].size == (merged / "config.json").stat().st_size

    res = CliRunner().invoke(main, ["push", str(merged), REPO, "--dry-run", "--private"])
    assert res.exit_code == 0, res.output
    assert "dry run" in res.output and "model-00001-of-00002.safetensors" in res.output
    assert "LFS" in res.output and hub.requests == []


def test_revision_and_pull_request(hub: FakeHub, merged: Path) -> None:
    hub.create(REPO)
    main_before = hub.repos[REPO].branches["main"]
    result = push(merged, REPO, token=TOKEN, exist_ok=True, create_pr=True)
    assert result.pr_url and result.pr_url.endswith("/discussions/1")
    assert hub.repos[REPO].branches["main"] == main_before
    assert "README.md" in hub.files(REPO, "refs/pr/1")

    push(merged, REPO, token=TOKEN, exist_ok=True, revision="dev")
    assert hub.repos[REPO].branches["main"] == main_before
    assert "config.json" in hub.files(REPO, "dev")


def test_a_file_containing_the_token_is_never_pushed(hub: FakeHub, merged: Path) -> None:
    (merged / "notes.txt").write_text(f"token={TOKEN}\n")
    with pytest.raises(HubError, match="notes.txt contains the Hub token") as info:
        push(merged, REPO, token=TOKEN)
    assert TOKEN not in str(info.value) and hub.requests == []


def test_planted_token_never_appears_in_output_logs_card_or_report(
        hub: FakeHub, merged: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # from the environment, as a user would
    runner = CliRunner()
    outputs = []
    for args in (["push", str(merged), REPO, "--dry-run"],
                 ["push", str(merged), REPO],
                 ["push", str(merged), REPO],  # exists: refused
                 ["push", str(merged), "bob/other"]):  # 403
        outputs.append(runner.invoke(main, ["--debug", *args] if args[-1] == REPO else args))
    hub.faults["commit"] = 500
    (merged / "config.json").write_text('{"changed": 1}')  # something to commit
    outputs.append(runner.invoke(main, ["push", str(merged), REPO, "--exist-ok"]))
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    outputs.append(runner.invoke(main, ["push", str(merged), REPO, "--exist-ok"]))

    codes = [r.exit_code for r in outputs]
    assert codes[:2] == [0, 0] and all(c != 0 for c in codes[2:]), [r.output for r in outputs]
    assert codes[3:] == [EXIT_HUB] * 3
    assert "HTTP 500" in outputs[4].output and "HTTP 401" in outputs[5].output
    texts = [r.output for r in outputs] + [str(r.exception or "") for r in outputs]
    texts += [caplog.text, *capfd.readouterr()]
    texts += [p.read_text(errors="replace") for p in merged.rglob("*") if p.is_file()]
    texts += [data.decode(errors="replace") for data in hub.files(REPO).values()]
    assert caplog.records  # the logs were really captured
    assert not [t for t in texts if TOKEN in t]


def test_cli_subprocess_never_prints_the_token(hub: FakeHub, merged: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
           "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_VERBOSITY": "debug", "HF_DEBUG": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    hub.faults["commit"] = 500
    proc = subprocess.run(
        [sys.executable, "-c", "from mergekit_collapse.cli import main; main()", "--debug",
         "push", str(merged), REPO],
        capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    assert "HTTP 500" in proc.stderr and REPO in proc.stderr
    assert "Authorization" in proc.stderr or "authenticated" in proc.stderr  # debug logging was on
    assert TOKEN not in proc.stdout + proc.stderr


def test_missing_revision_is_a_404_hub_error_and_private_repos_stay_private(
        hub: FakeHub, merged: Path) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    push(merged, REPO, token=TOKEN, private=True)
    assert hub.repos[REPO].private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info(REPO, token=False)
    before = state(hub, REPO)
    (merged / "config.json").write_text("{}")
    with pytest.raises(HubError, match="HTTP 404") as info:
        push(merged, REPO, token=TOKEN, exist_ok=True, create_pr=True, revision="no-such-branch")
    assert "\n" not in str(info.value) and REPO in str(info.value)
    assert state(hub, REPO) == before


def test_no_absolute_local_path_reaches_the_hub(hub: FakeHub, tmp_path: Path) -> None:
    """mergekit_config.yml, the report and any text file keep their absolute paths locally; the
    pushed copies carry display names or relative paths instead (the plan's sizes say so)."""
    out = make_merged_dir(tmp_path)
    local_model = tmp_path / "models" / "my-finetune"
    (out / "mergekit_config.yml").write_text("merge_method: linear\nmodels:\n"
                                             f"  - model: {local_model}\n")
    (out / "mergeability" / "notes.md").write_text(f"adapter read from {tmp_path}/zoo/adapters/x\n")
    write_card(out)
    result = push(out, REPO, token=TOKEN)
    pushed = hub.files(REPO)
    assert [name for name, data in pushed.items() if str(tmp_path).encode() in data] == []
    assert b"my-finetune" in pushed["mergekit_config.yml"]
    # the local copy is untouched
    assert str(local_model) in (out / "mergekit_config.yml").read_text()
    sizes = {f.path_in_repo: f.size for f in result.files}
    assert all(sizes[name] == len(pushed[name]) for name in sizes)
