"""MergeLens's compatibility score (its "Merge Compatibility Index", MCI) for a pair of models.

MergeLens (`pip install mergelens`, 2.0.3; not a dependency of this project) compares checkpoints
statically, tensor by tensor, from safetensors. Its MCI (`mergelens.compare.metrics.
compute_heuristic_assessment`) is a hand-weighted score in [0, 100] over the *raw weights* of a
reference and a candidate, parameter-weighted over exact-shape tensors:

* 0.40 x cosine similarity of the flattened weights (clamped to [0, 1]),
* 0.20 x spectral overlap (1 - Grassmann distance of the top-k left singular subspaces, k=64),
* 0.10 x effective-rank ratio (min/max of the two matrices' entropy effective ranks),

renormalised over the signals that could be computed. **Higher = more compatible**: >= 75 is
"lower_static_conflict", 55-75 "mixed_static_signals", < 55 "elevated_static_conflict"; MergeLens
itself says the weights and thresholds are uncalibrated.

Pairing: without a base, model A is the reference and B the candidate, so the score compares A and
B directly. With a base (`compare_models([a, b], base_model=base)`), each candidate is compared to
the base and the aggregate is the *lowest* (base, candidate) score: it then measures how far each
model moved from the base, not A against B (MergeLens's task-vector signals, sign disagreement and
TSV interference, are reported beside the score but do not enter it). Fine-tunes of one base have
weight cosines near 1, so the score sits near 100 for almost any pair.

    python benchmarks/mergelens_score.py A_DIR B_DIR [--base BASE_DIR]
    python benchmarks/mergelens_score.py --demo        # tiny models + one real SmolLM2 pair, timed
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: the only signals the MCI reads; MergeLens's other default signals (L2, sign disagreement, TSV
#: interference, task-vector energy) are reported beside it and cost extra SVDs, not score
SCORE_METRICS = ("cosine_similarity", "spectral_overlap", "effective_rank_ratio")


def merge_lora(base_dir: str | Path, lora_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base+LoRA as a full safetensors model (peft `merge_and_unload`), for MergeLens.

    Args:
        base_dir: the base model folder. lora_dir: the peft adapter folder. out_dir: where to save.

    Returns:
        `out_dir`.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(lora_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def _full_model(path: Path, base_dir: str | Path | None, tmp: Path) -> Path:
    if (path / "adapter_config.json").is_file():
        if base_dir is None:
            raise ValueError(f"{path} is a LoRA adapter: MergeLens needs full weights, "
                             "pass base_dir")
        return merge_lora(base_dir, path, tmp / path.name)
    return path


def mergelens_result(model_a_dir: str | Path, model_b_dir: str | Path,
                     base_dir: str | Path | None = None,
                     metrics: tuple[str, ...] | None = SCORE_METRICS) -> Any:
    """MergeLens's full `CompareResult` for a pair (LoRA adapter folders are merged first).

    Args:
        model_a_dir: full model folder, or a peft adapter folder (then `base_dir` is required).
        model_b_dir: the same for model B.
        base_dir: explicit shared base, or None (then A is the reference).
        metrics: MergeLens signals to compute (default: the three the score uses, which gives the
            same score as MergeLens's defaults, faster); None = MergeLens's defaults.

    Returns:
        `mergelens.models.CompareResult`; `.mci.score` is the compatibility score.

    Raises:
        ImportError: mergelens is not installed. ValueError: an adapter without a base.
    """
    from mergelens import compare_models

    with tempfile.TemporaryDirectory(prefix="mergelens-") as tmp:
        a = _full_model(Path(model_a_dir), base_dir, Path(tmp))
        b = _full_model(Path(model_b_dir), base_dir, Path(tmp))
        return compare_models([str(a), str(b)], base_model=str(base_dir) if base_dir else None,
                              metrics=list(metrics) if metrics else None, show_progress=False,
                              include_strategy=False)


def mergelens_pair_score(model_a_dir: str | Path, model_b_dir: str | Path,
                         base_dir: str | Path | None = None) -> float:
    """MergeLens's Merge Compatibility Index of a pair, in [0, 100]; higher = more compatible.

    Args:
        model_a_dir: full model folder, or a peft adapter folder (then `base_dir` is required).
        model_b_dir: the same for model B.
        base_dir: explicit shared base (score = min over (base, A) and (base, B)), or None
            (score of A vs B).

    Returns:
        The MCI score; NaN when MergeLens withholds it ("insufficient_evidence").

    Raises:
        ImportError: mergelens is not installed. ValueError: an adapter without a base.
    """
    score = mergelens_result(model_a_dir, model_b_dir, base_dir).mci.score
    return float("nan") if score is None else float(score)


def mergelens_base_scores(base_dir: str | Path, model_dirs: dict[str, Path],
                          tmp: str | Path) -> dict[str, float]:
    """MergeLens's per-candidate scores against an explicit shared base, from one `compare_models`.

    With a base, MergeLens scores each (base, candidate) pair and reports the lowest as the set's
    score, so these N numbers give its score for every subset: `min` over the members.

    Args:
        base_dir: the shared base model folder.
        model_dirs: name -> full model folder, or peft adapter folder (merged into `tmp` first).
        tmp: scratch folder for the merged adapters.

    Returns:
        name -> MCI score in [0, 100] (NaN where MergeLens withholds it).
    """
    from mergelens import compare_models

    full = [str(_full_model(Path(d), base_dir, Path(tmp))) for d in model_dirs.values()]
    res = compare_models(full, base_model=str(base_dir), metrics=list(SCORE_METRICS),
                         show_progress=False, include_strategy=False)
    scores = [res.pair_assessments[f"comparison_{i}"].score for i in range(len(full))]
    return {name: float("nan") if s is None else float(s)
            for name, s in zip(model_dirs, scores, strict=True)}


def _demo() -> dict[str, Any]:
    """Tiny Llamas from tests/common.py, then one real SmolLM2 pair (timed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.common import make_finetune, make_lora, make_tiny_llama

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        base = make_tiny_llama(tmp / "base")
        near_a = make_finetune(base, tmp / "near_a", seed=1, scale=0.002)
        near_b = make_finetune(base, tmp / "near_b", seed=2, scale=0.002)
        far = make_finetune(base, tmp / "far", seed=3, scale=0.2)
        other = make_tiny_llama(tmp / "other", seed=7)
        lora = make_lora(base, tmp / "lora", seed=4)
        out["tiny"] = {
            "near_a~near_b": mergelens_pair_score(near_a, near_b),
            "near_a~far": mergelens_pair_score(near_a, far),
            "base~unrelated_init": mergelens_pair_score(base, other),
            "near_a~near_b|base": mergelens_pair_score(near_a, near_b, base),
            "near_a~far|base": mergelens_pair_score(near_a, far, base),
            "near_a~lora|base": mergelens_pair_score(near_a, lora, base),
        }
        # the score reads only SCORE_METRICS: same value as with MergeLens's default signals
        out["tiny"]["same_as_default_metrics"] = (
            mergelens_result(near_a, far, metrics=None).mci.score
            == mergelens_result(near_a, far).mci.score)
    from mergekit_collapse.demo.base_model import ensure_smollm2
    from mergekit_collapse.demo.zoo import ADAPTER_DIR

    smol = ensure_smollm2()
    adapters = sorted(p for p in ADAPTER_DIR.iterdir()
                      if (p / "adapter_model.safetensors").is_file())
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if len(adapters) >= 2:
            a, b, label = adapters[0], adapters[1], f"{adapters[0].name}~{adapters[1].name}"
        else:  # one real adapter so far: pair it with a random r=8 LoRA of the same shape
            a, label = adapters[0], f"{adapters[0].name}~random_r8"
            b = make_lora(smol, tmp / "random_r8", seed=0, r=8, scale=0.01)
        t0 = time.perf_counter()
        fa, fb = merge_lora(smol, a, tmp / "fa"), merge_lora(smol, b, tmp / "fb")
        t1 = time.perf_counter()
        res = mergelens_result(fa, fb)
        t2 = time.perf_counter()
        out["smollm2"] = {"pair": label, "score_a_vs_b": res.mci.score,
                          "risk_tier": res.mci.risk_tier, "components": res.mci.components,
                          "lora_merge_s": round(t1 - t0, 1), "score_s": round(t2 - t1, 1),
                          "load": os.getloadavg()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", nargs="?")
    p.add_argument("b", nargs="?")
    p.add_argument("--base")
    p.add_argument("--demo", action="store_true", help="tiny models + one real SmolLM2 pair")
    args = p.parse_args(argv)
    if args.demo:
        print(json.dumps(_demo(), indent=2))
        return 0
    if not (args.a and args.b):
        p.error("give two model folders, or --demo")
    print(mergelens_pair_score(args.a, args.b, args.base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
