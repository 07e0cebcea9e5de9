"""Shared test fixtures for reports and merged folders: a small but complete GuardReport, an
evaluation summary, and a fake mergekit output folder carrying both."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_collapse.guard.report import (
    Action,
    Bounds,
    BudgetInfo,
    Distances,
    GuardReport,
    ModelEntry,
    ProbeInfo,
)

MODELS = ["acme/llama-sentiment", "acme/llama-math", "/local/ckpt/llama-code"]
MERGEKIT_YAML = """\
merge_method: ties
base_model: acme/llama-base
models:
  - model: acme/llama-sentiment
    parameters: {weight: 0.5, density: 0.5}
  - model: acme/llama-math
    parameters: {weight: 0.5, density: 0.5}
dtype: float32
"""


def make_report(*, verdict: str = "mergeable") -> GuardReport:
    """A small but complete GuardReport (three models, one with infinite MDS, one action)."""
    rms = [[0.0, 1.0, 2.0], [1.0, 0.0, 1.5], [2.0, 1.5, 0.0]]
    return GuardReport(
        tool_version="0.1.0",
        config="merge.yml",
        merge_method="ties",
        base_model="acme/llama-base",
        models=[
            ModelEntry(name=MODELS[0], task="sentiment", mds=1.25, mean_hidden_sim=0.8,
                       distortion_optimal=0.5, distortion_uniform=0.6, retention=0.7),
            ModelEntry(name=MODELS[1], task="math", mds=1.5, mean_hidden_sim=0.66,
                       distortion_optimal=0.75, distortion_uniform=0.9),
            ModelEntry(name=MODELS[2], task="code", mds=float("inf"), mean_hidden_sim=0.0,
                       distortion_optimal=1.0, distortion_uniform=1.2),
        ],
        hidden_sim=[[1.0, 1.0, 0.0], [1.0, 1.0, 0.5], [0.0, 0.5, 1.0]],
        distances=Distances(mean=rms, rms=rms),
        bounds=Bounds(diameter=2.0, converse=1.0, jung=4 / 3, jung_n=2, jung_dim="affine",
                      exact=1.0, uniform=1.2),
        weights={MODELS[0]: 0.5, MODELS[1]: 0.0, MODELS[2]: 0.5},
        budget=BudgetInfo(mode="relative", value=0.5, absolute=1.1, scale=2.2,
                          scale_source="base spread"),
        verdict=verdict,
        decided_by="exact",
        probes=ProbeInfo(k=5, count=15, sha256="ab" * 32, seed=0, chat_template=True),
        layer=-1,
        pooling="last",
        dtype="float32",
        hidden_size=32,
        actions=[Action(action="warn", changed="nothing", reason="code is the outlier")],
    )


EVALUATION = {
    "schema_version": "1.0", "limit": 50, "mean_loss": -20.1,
    "tasks": [
        {"model": MODELS[0], "task": "sentiment", "eval": "sst2", "metric": "acc",
         "constituent": 0.95, "merged": 0.6, "base": 0.5, "loss": -36.8, "observed_retention": 0.4},
        {"model": MODELS[1], "task": "math", "eval": "gsm8k", "metric": "exact_match",
         "constituent": 0.3, "merged": 0.29, "base": 0.1, "loss": -3.3},
    ],
}


def make_merged_dir(root: Path, *, evaluation: bool = True, lfs_size: int = 0,
                    report: GuardReport | None = None) -> Path:
    """A fake mergekit output folder: tiny weights/config/tokenizer files + mergeability/ outputs.

    `lfs_size` > 0 adds `model-00002-of-00002.safetensors` of that many (seeded random) bytes.
    """
    import random

    out = root / "merged"
    out.mkdir(parents=True)
    rng = random.Random(0)
    (out / "model-00001-of-00002.safetensors").write_bytes(rng.randbytes(2048))
    if lfs_size:
        (out / "model-00002-of-00002.safetensors").write_bytes(rng.randbytes(lfs_size))
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (out / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (out / "tokenizer_config.json").write_text("{}")
    (out / "mergekit_config.yml").write_text(MERGEKIT_YAML)
    (out / "README.md").write_text("---\ntags: [merge, mergekit]\n---\n# merged\n"
                                   "mergekit's own README\n")
    (report or make_report()).write(out / "mergeability")
    if evaluation:
        (out / "mergeability" / "evaluation.json").write_text(json.dumps(EVALUATION))
        (out / "mergeability" / "predicted_vs_observed.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    return out
