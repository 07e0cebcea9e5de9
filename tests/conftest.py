"""Shared fixtures: one tiny real model zoo per test session (base, full fine-tunes, LoRA
adapters)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from common import make_finetune, make_lora, make_tiny_llama  # noqa: E402
from hub_server import OTHER_TOKEN, TOKEN, FakeHub  # noqa: E402

#: MergeKit's vendored test suite runs in its own subprocess (test_mergekit_suite.py), never here
collect_ignore = ["mergekit_suite"]

#: hypothesis: a fixed seed by default, so a fuzz find never blocks a landing at random; a deeper
#: random search is opt-in: HYPOTHESIS_PROFILE=random FUZZ_EXAMPLES=2000 (README, Development)
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("random", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft1..ft3 (perturbed copies; ft3 perturbed far more: the outlier), lora1..lora3."""
    root = tmp_path_factory.mktemp("zoo")
    base = make_tiny_llama(root / "base", seed=0)
    zoo = {"base": base}
    for i, scale in ((1, 0.01), (2, 0.01), (3, 0.08)):
        zoo[f"ft{i}"] = make_finetune(base, root / f"ft{i}", seed=i, scale=scale)
    for i in (1, 2, 3):
        zoo[f"lora{i}"] = make_lora(base, root / f"lora{i}", seed=10 + i)
    return zoo


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache root, so tests never share cached hidden states."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MERGEKIT_COLLAPSE_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return cache


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running fake Hub; HF_ENDPOINT points at it, Xet is off, no stored login, no HF_TOKEN.

    huggingface_hub reads HF_HUB_DISABLE_XET / HF_HUB_OFFLINE / HF_TOKEN_PATH once at import, so the
    constants are patched too (conftest sets HF_HUB_OFFLINE=1 for every test).
    """
    from huggingface_hub import constants

    server = FakeHub({TOKEN: "alice", OTHER_TOKEN: "bob"}).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    # the client's user-agent code fetches an "agent harness" registry from constants.ENDPOINT once:
    # keep that off the network (a fresh empty cache) and everything else on the fake Hub
    registry = tmp_path / "agent_harnesses.json"
    registry.write_text('{"standardEnvVars": [], "harnesses": {}}')
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(registry))
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr("huggingface_hub.utils._detect_agent._registry", None)
    yield server
    server.stop()
