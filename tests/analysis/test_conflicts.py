"""Parameter-conflict metrics (Eqs. 4–7): hand-computed values, streamed == naive, LoRA τ == peft
merge."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_collapse.analysis.conflicts import (
    METRICS,
    LoraAdapter,
    WeightDir,
    conflict_metrics,
    resolve_sources,
    task_vector,
)
from mergekit_collapse.errors import BadInputError


def _naive():
    import naive_conflicts  # the test oracle, beside this file

    return naive_conflicts


def _save(path: Path, tensors: dict[str, list]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()}
    sd["step"] = torch.tensor([7], dtype=torch.int64)  # integer buffers are not parameters
    save_file(sd, str(path / "model.safetensors"))
    return path


@pytest.fixture
def hand(tmp_path: Path) -> dict[str, Path]:
    """base = 0 / ones; τ1 = [1,-2,0,3 | 0,1], τ2 = [2,1,0,-1 | 0,-1], τ3 = [1,0,0,0 | 0,0]."""
    return {
        "base": _save(tmp_path / "base", {"w.weight": [[0, 0], [0, 0]], "b": [1, 1]}),
        "m1": _save(tmp_path / "m1", {"w.weight": [[1, -2], [0, 3]], "b": [1, 2]}),
        "m2": _save(tmp_path / "m2", {"w.weight": [[2, 1], [0, -1]], "b": [1, 0]}),
        "m3": _save(tmp_path / "m3", {"w.weight": [[1, 0], [0, 0]], "b": [1, 1]}),
    }


def test_hand_computed_pair(hand: dict[str, Path]) -> None:
    r = conflict_metrics([hand["m1"], hand["m2"], hand["m3"]], base=hand["base"])
    # pair (1,2): ||τ1||₁ = 7, ||τ2||₁ = 5; |τ1−τ2| = [1,3,0,4,0,2];
    # signs differ at 3 of 6 positions
    assert r.magnitude_change_ratio[0][1] == pytest.approx(10 / 12)
    assert r.sign_change_ratio[0][1] == pytest.approx(3 / 6)
    assert r.conflicting_magnitude_ratio[0][1] == pytest.approx((3 + 4 + 2) / 12)
    # Eq. 7 per tensor: w: −3/(√14·√6), b: −1/(1·1); averaged
    assert r.cosine_similarity[0][1] == pytest.approx((-3 / math.sqrt(84) - 1) / 2)
    assert r.cosine_similarity_flat[0][1] == pytest.approx(-4 / math.sqrt(105))
    # pair (1,3): τ3 is zero on `b`, so that tensor has no cosine; a 0 against ±x is a sign change
    assert r.magnitude_change_ratio[0][2] == pytest.approx(6 / 8)
    assert r.sign_change_ratio[0][2] == pytest.approx(3 / 6)
    assert r.conflicting_magnitude_ratio[0][2] == pytest.approx(6 / 8)
    assert r.cosine_similarity[0][2] == pytest.approx(1 / math.sqrt(14))
    assert r.cosine_similarity_flat[0][2] == pytest.approx(1 / math.sqrt(15))
    # symmetric, diagonal 0 / 1, positions = 6 per pair, 2 float tensors (the int64 buffer skipped)
    for m in METRICS:
        mat = r.metric(m)
        assert mat[1][0] == pytest.approx(mat[0][1])
    assert [r.magnitude_change_ratio[i][i] for i in range(3)] == [0, 0, 0]
    assert [r.cosine_similarity[i][i] for i in range(3)] == pytest.approx([1, 1, 1])
    assert r.positions[0][1] == 6 and r.tensors == 2


def test_chunking_does_not_change_values(hand: dict[str, Path]) -> None:
    models = [hand["m1"], hand["m2"], hand["m3"]]
    whole = conflict_metrics(models, base=hand["base"])
    rows = conflict_metrics(models, base=hand["base"], chunk_elements=1)
    for m in METRICS:
        for a, b in zip(rows.metric(m), whole.metric(m), strict=True):
            assert a == pytest.approx(b)


def test_sharded_and_pickle(hand: dict[str, Path], tmp_path: Path) -> None:
    shard = tmp_path / "m2_sharded"
    shard.mkdir()
    save_file({"w.weight": torch.tensor([[2.0, 1.0], [0.0, -1.0]])},
              str(shard / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.tensor([1.0, 0.0])}, str(shard / "model-00002-of-00002.safetensors"))
    (shard / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w.weight": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors"}}))
    r = conflict_metrics([hand["m1"], shard], base=hand["base"])
    assert r.magnitude_change_ratio[0][1] == pytest.approx(10 / 12)
    (shard / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(BadInputError, match="unreadable shard index"):
        conflict_metrics([hand["m1"], shard], base=hand["base"])

    pickled = tmp_path / "m2_bin"
    pickled.mkdir()
    torch.save({"w.weight": torch.tensor([[2.0, 1.0], [0.0, -1.0]]), "b": torch.tensor([1.0, 0.0])},
               pickled / "pytorch_model.bin")
    with pytest.raises(BadInputError, match="pickle"):
        conflict_metrics([hand["m1"], pickled], base=hand["base"])
    r = conflict_metrics([hand["m1"], pickled], base=hand["base"], allow_pickle=True)
    assert r.sign_change_ratio[0][1] == pytest.approx(0.5)


def test_bad_inputs(hand: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="at least 2"):
        conflict_metrics([hand["m1"]], base=hand["base"])
    with pytest.raises(BadInputError, match="base"):
        conflict_metrics([hand["m1"], hand["m2"]])
    with pytest.raises(BadInputError, match="not a local folder"):
        conflict_metrics([hand["m1"], tmp_path / "nope"], base=hand["base"])
    odd = _save(tmp_path / "odd", {"w.weight": [[1, 2, 3]], "b": [1, 1]})
    with pytest.raises(BadInputError, match="shape"):
        conflict_metrics([hand["m1"], odd], base=hand["base"])
    extra = _save(tmp_path / "extra", {"w.weight": [[0, 0], [0, 0]], "b": [1, 1], "c": [1]})
    with pytest.raises(BadInputError, match="different tensors"):
        conflict_metrics([hand["m1"], extra], base=hand["base"])


def _adapter(path: Path, a: list, b: list, cfg: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({"base_model.model.w.lora_A.weight": torch.tensor(a, dtype=torch.float32),
               "base_model.model.w.lora_B.weight": torch.tensor(b, dtype=torch.float32)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **cfg}))
    return path


def test_lora_hand_computed(hand: dict[str, Path], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    # τ_w = (alpha / r) · B @ A = 2 · [[1],[−1]] @ [[1, 2]] = [[2, 4], [−2, −4]]; zero on `b`
    lora = _adapter(tmp_path / "lora", [[1, 2]], [[1], [-1]], {"r": 1, "lora_alpha": 2})
    ad = LoraAdapter(lora)
    assert ad.modules["w.weight"].scaling == 2.0
    assert ad.delta("w.weight", 0, 2).tolist() == [[2, 4], [-2, -4]]
    rs = _adapter(tmp_path / "rs", [[1, 2]], [[1], [-1]],
                  {"r": 4, "lora_alpha": 2, "use_rslora": True})
    assert LoraAdapter(rs).modules["w.weight"].scaling == pytest.approx(2 / math.sqrt(4))
    pat = _adapter(tmp_path / "pat", [[1, 2]], [[1], [-1]],
                   {"r": 1, "lora_alpha": 2, "alpha_pattern": {"w": 6}, "rank_pattern": {"x": 9}})
    assert LoraAdapter(pat).modules["w.weight"].scaling == 6.0
    # against m1 (τ1 = [1,-2,0,3 | 0,1]): LoRA τ = [2,4,-2,-4 | 0,0]; the base is never read
    r = conflict_metrics([f"{hand['base']}+{lora}", hand["m1"]], base=hand["base"])
    assert r.magnitude_change_ratio[0][1] == pytest.approx((1 + 6 + 2 + 7 + 0 + 1) / (12 + 7))
    assert r.sign_change_ratio[0][1] == pytest.approx(4 / 6)  # positions 1, 2, 3, 5
    assert r.conflicting_magnitude_ratio[0][1] == pytest.approx((6 + 2 + 7 + 1) / 19)
    cosine = (2 - 8 + 0 - 12) / (math.sqrt(40) * math.sqrt(14))
    assert r.cosine_similarity[0][1] == pytest.approx(cosine)
    # two LoRAs only: no base given (their shared model is it), no base weight read,
    # positions = the adapted module only
    _, _, base_name, _ = resolve_sources([f"{hand['base']}+{lora}", f"{hand['base']}+{rs}"], None)
    assert base_name == str(hand["base"])
    reads: list[Path] = []
    real_read = WeightDir.read

    def spy(self: WeightDir, *args: object) -> torch.Tensor:
        reads.append(self.path)
        return real_read(self, *args)

    monkeypatch.setattr(WeightDir, "read", spy)
    r = conflict_metrics([f"{hand['base']}+{lora}", f"{hand['base']}+{rs}"])
    assert r.positions[0][1] == 4 and r.cosine_similarity[0][1] == pytest.approx(1.0)
    assert reads and hand["base"] not in reads
    bad = _adapter(tmp_path / "bad", [[1, 2]], [[1], [-1]], {"r": 1})
    (bad / "adapter_model.safetensors").rename(bad / "tmp")
    save_file({"base_model.model.v.lora_A.weight": torch.ones(1, 2),
               "base_model.model.v.lora_B.weight": torch.ones(2, 1)},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(BadInputError, match="does not have"):
        conflict_metrics([f"{hand['base']}+{bad}", hand["m1"]], base=hand["base"])
    pickled = _adapter(tmp_path / "pickled", [[1, 2]], [[1], [-1]], {"r": 1, "lora_alpha": 2})
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(BadInputError, match="pickle"):
        LoraAdapter(pickled)
    delta = LoraAdapter(pickled, allow_pickle=True).delta("w.weight", 0, 2)
    assert delta.tolist() == [[2, 4], [-2, -4]]
    dora = _adapter(tmp_path / "dora", [[1, 2]], [[1], [-1]], {"r": 1, "use_dora": True})
    with pytest.raises(BadInputError, match="DoRA"):
        LoraAdapter(dora)
    ia3 = _adapter(tmp_path / "ia3", [[1, 2]], [[1], [-1]], {"peft_type": "IA3"})
    with pytest.raises(BadInputError, match="IA3 is not LoRA"):
        LoraAdapter(ia3)
    (ia3 / "adapter_config.json").write_text("{not json")
    with pytest.raises(BadInputError, match="unreadable"):
        LoraAdapter(ia3)
    (ia3 / "adapter_config.json").unlink()
    with pytest.raises(BadInputError, match="not a peft adapter"):
        LoraAdapter(ia3)


def test_streamed_equals_naive_on_zoo(tiny_zoo: dict[str, Path]) -> None:
    z = {k: str(v) for k, v in tiny_zoo.items()}
    refs = [z["ft1"], z["ft2"], z["ft3"], f"{z['base']}+{z['lora1']}", f"{z['base']}+{z['lora2']}",
            f"{z['ft1']}+{z['lora3']}"]
    streamed = conflict_metrics(refs, base=z["base"], chunk_elements=4096)
    naive = _naive().naive_conflict_metrics(refs, z["base"])
    for m in METRICS:
        for row_s, row_n in zip(streamed.metric(m), naive[m], strict=True):
            assert row_s == pytest.approx(row_n, rel=1e-9, abs=1e-12), m
    # full fine-tunes carry independent noise (≈ half the signs differ); a LoRA is zero outside
    # its attention modules, where every changed parameter of a full model is a sign change
    assert streamed.sign_change_ratio[0][3] > 0.8 > streamed.sign_change_ratio[0][1]


def test_lora_tau_matches_peft_merge(tiny_zoo: dict[str, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_zoo["base"], dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(tiny_zoo["lora1"])).merge_and_unload()
    after = merged.state_dict()
    sources, base_w, _, _ = resolve_sources([f"{tiny_zoo['base']}+{tiny_zoo['lora1']}"],
                                            tiny_zoo["base"])
    src = sources[0]
    assert src.names and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                         "o_proj.weight")) for n in src.names)
    for name, w in after.items():
        expected = (w.double() - before[name].double())
        tau = task_vector(src, base_w, name)
        if tau is None:
            assert torch.count_nonzero(expected) == 0, name
        else:
            assert torch.allclose(tau, expected, atol=1e-6), name


def test_config_and_cli(tiny_zoo: dict[str, Path], tmp_path: Path) -> None:
    from mergekit_collapse.cli import main

    cfg = tmp_path / "merge.yml"
    cfg.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {tiny_zoo['base']}\n"
        "models:\n"
        f"  - model: {tiny_zoo['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {tiny_zoo['base']}+{tiny_zoo['lora1']}\n    parameters: {{weight: 0.5}}\n"
        "dtype: float32\n")
    direct = conflict_metrics(cfg)
    assert direct.names == [str(tiny_zoo["ft1"]), f"{tiny_zoo['base']}+{tiny_zoo['lora1']}"]
    out = tmp_path / "c.json"
    res = CliRunner().invoke(main, ["conflicts", str(cfg), "--format", "json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["sign_change_ratio"][0][1] == pytest.approx(direct.sign_change_ratio[0][1])
    res = CliRunner().invoke(main, ["conflicts", str(cfg)])
    assert res.exit_code == 0 and "sign_change_ratio" in res.output
    # each matrix: a header of model labels, then one row per model with its 4-digit values
    lines = res.output.splitlines()
    at = lines.index(f"sign_change_ratio ({METRICS['sign_change_ratio']})")
    assert lines[at + 1].split() == ["[0]", "[1]"]
    assert lines[at + 2].split() == ["[0]", *(f"{v:.4f}" for v in direct.sign_change_ratio[0])]
    res = CliRunner().invoke(main, ["conflicts", str(tmp_path / "missing.yml")])
    assert res.exit_code == 2 and "not found" in res.output
