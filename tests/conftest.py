"""Shared fixtures: one tiny real model zoo per test session (base, full fine-tunes, LoRA adapters)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from common import make_finetune, make_lora, make_tiny_llama  # noqa: E402


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
