"""The merged model run a layer at a time (models/streamed.py) against mergekit's own merge written
to disk and loaded whole: the same logits, on tiny real Llamas and Gemma 3s (sliding-window
layers, tied embeddings), full fine-tunes and LoRAs, every method the rehearsal supports."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from common import make_finetune, make_lora, make_tokenizer

from mergekit_collapse.guard.rehearsal import forced_batches, read_forced, teacher_forced
from mergekit_collapse.models.lora import LoraTensorLoader, lora_updates
from mergekit_collapse.models.streamed import merged_logits

PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65], [1, 70, 71, 72]]
ANSWERS = [[80, 81, 2], [82, 2], [83, 84, 85, 2], [86, 2]]


def _merge_config(refs: list[str], method: str, base: str | None, **params: float) -> dict:
    raw = {"merge_method": method, "dtype": "float32",
           "models": [{"model": r, "parameters": {"weight": 1.0, **params}} for r in refs]}
    if base is not None and method != "linear":  # mergekit's linear would want a weight for it
        raw["base_model"] = base
    if method == "slerp":
        raw = {"merge_method": "slerp", "dtype": "float32", "base_model": refs[0],
               "models": [{"model": r} for r in refs], "parameters": {"t": 0.4}}
    return raw


def _mergekit_logits(raw: dict, tmp: Path) -> tuple[list[list[int]], object]:
    """mergekit-yaml's merge (run_merge to disk, LoRAs through its cache), loaded whole."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM

    out = tmp / "merged"
    run_merge(MergeConfiguration.model_validate(raw), str(out),
              options=MergeOptions(lora_merge_cache=str(tmp / "lora"), copy_tokenizer=False,
                                   quiet=True, random_seed=0))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return teacher_forced(model, PROMPTS, ANSWERS, 0, batch_size=3)


def _streamed(raw: dict, seed: int = 0, **kw) -> tuple[list[list[int]], object]:
    from mergekit.config import MergeConfiguration

    batches = forced_batches(PROMPTS, ANSWERS, 0, batch_size=3)
    logits = merged_logits(MergeConfiguration.model_validate(raw), [b for _, b in batches],
                           dtype=torch.float32, seed=seed, **kw)
    return read_forced(batches, logits, ANSWERS)


def _assert_same(a, b) -> None:
    assert a[0] == b[0]  # every argmax
    assert abs(a[1] - b[1]).max() == 0, abs(a[1] - b[1]).max()  # first-token log-probs


@pytest.mark.parametrize(("members", "method"), [
    (["ft1", "ft2"], "linear"), (["ft1", "ft2", "ft3"], "task_arithmetic"),
    (["ft1", "lora1"], "ties"), (["lora1", "lora2"], "linear"), (["ft1", "ft3"], "slerp"),
    (["lora1", "lora2", "ft2"], "breadcrumbs_ties"), (["ft1", "ft2"], "model_stock"),
])
def test_the_streamed_merge_is_mergekits_merge(tiny_zoo, tmp_path, caplog, members, method):
    """Bitwise the merge mergekit writes; under element-wise methods the embeddings (larger than
    any layer's tensor) are merged a block of rows at a time, to the same values."""
    caplog.set_level(logging.DEBUG, logger="mergekit_collapse.models.streamed")
    refs = [str(tiny_zoo[m]) if "lora" not in m else f"{tiny_zoo['base']}+{tiny_zoo[m]}"
            for m in members]
    params = {"density": 0.5} if "ties" in method else {}
    raw = _merge_config(refs, method, str(tiny_zoo["base"]), **params)
    if method == "breadcrumbs_ties":
        raw["models"] = [{"model": r, "parameters": {"weight": 1.0, "density": 0.8, "gamma": 0.05}}
                         for r in refs]
    _assert_same(_streamed(raw), _mergekit_logits(raw, tmp_path))
    by_rows = [r.getMessage() for r in caplog.records if "rows at a time" in r.getMessage()]
    assert bool(by_rows) == (method in ("linear", "task_arithmetic")), by_rows


def _tiny_gemma3(path: Path, seed: int) -> Path:
    """A random Gemma 3 text model: sliding-window and full-attention layers, tied embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = make_tokenizer()
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, sliding_window=4, max_position_embeddings=128,
                           layer_types=["sliding_attention", "sliding_attention",
                                        "full_attention", "sliding_attention"],
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def test_sliding_window_layers_and_tied_embeddings(tmp_path):
    base = _tiny_gemma3(tmp_path / "base", 0)
    ft = make_finetune(base, tmp_path / "ft", seed=1, scale=0.05)
    lora = make_lora(base, tmp_path / "lora", seed=2)
    raw = _merge_config([str(ft), f"{base}+{lora}"], "task_arithmetic", str(base))
    streamed = _streamed(raw)
    _assert_same(streamed, _mergekit_logits(raw, tmp_path))
    # the pass is not trivially the base's: the merge moved the answers' log-probs
    from transformers import AutoModelForCausalLM

    own = teacher_forced(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(),
                         PROMPTS, ANSWERS, 0, batch_size=3)
    assert abs(own[1] - streamed[1]).max() > 1e-3


def test_one_layer_at_a_time(tiny_zoo):
    """At every stage at most one decoder layer holds weights (the others are on `meta`)."""
    from mergekit.config import MergeConfiguration

    from mergekit_collapse.models import streamed

    seen: list[int] = []
    original = streamed._Merger.fill

    def fill(self, groups):
        original(self, groups)
        layers = self.model.get_decoder().layers
        seen.append(sum(any(not p.is_meta for p in layer.parameters()) for layer in layers))

    raw = _merge_config([str(tiny_zoo["ft1"]), str(tiny_zoo["ft2"])], "linear", None)
    batches = forced_batches(PROMPTS, ANSWERS, 0, batch_size=3)
    mp = pytest.MonkeyPatch()
    mp.setattr(streamed._Merger, "fill", fill)
    try:
        merged_logits(MergeConfiguration.model_validate(raw), [b for _, b in batches],
                      dtype=torch.float32)
    finally:
        mp.undo()
    assert seen == [0, 1, 1, 0]  # embeddings, layer 1, layer 2, head


def test_dare_is_seeded_per_tensor(tiny_zoo):
    refs = [str(tiny_zoo["ft1"]), str(tiny_zoo["ft2"])]
    raw = _merge_config(refs, "dare_ties", str(tiny_zoo["base"]), density=0.3)
    first, again, other = _streamed(raw, seed=0), _streamed(raw, seed=0), _streamed(raw, seed=1)
    assert first[0] == again[0] and (first[1] == again[1]).all()
    assert abs(first[1] - other[1]).max() > 0


def test_slices_are_merged_as_mergekit_merges_them(tiny_zoo, tmp_path):
    ft1, ft2 = str(tiny_zoo["ft1"]), str(tiny_zoo["ft2"])
    raw = {"merge_method": "linear", "dtype": "float32", "slices": [
        {"sources": [{"model": ft1, "layer_range": [0, 1], "parameters": {"weight": 0.3}},
                     {"model": ft2, "layer_range": [0, 1], "parameters": {"weight": 0.7}}]},
        {"sources": [{"model": ft2, "layer_range": [1, 2], "parameters": {"weight": 1.0}}]}]}
    _assert_same(_streamed(raw), _mergekit_logits(raw, tmp_path))


@pytest.mark.parametrize("options", [{}, {"use_rslora": True},
                                     {"rank_pattern": {"q_proj": 2},
                                      "alpha_pattern": {"v_proj": 3}}])
def test_lora_tensors_are_pefts_merge(tiny_zoo, tmp_path, options):
    """base + scale·B·A per tensor equals peft's merge_and_unload, tensor for tensor."""
    from mergekit.common import ModelReference
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = tiny_zoo["base"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=5, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj"],
                                                  **options))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()
    loader = ModelReference.model_validate({"model": str(base)}).lazy_loader(lazy_unpickle=False)
    updates = lora_updates(tmp_path / "adapter", set(loader.index.tensor_paths))
    assert updates is not None and len(updates) == 6  # 3 modules x 2 layers
    ours = LoraTensorLoader(loader, updates)
    for name in load_file(base / "model.safetensors"):
        assert torch.equal(ours.get_tensor(name), expected[name]), name


def test_adapters_other_than_plain_lora_go_to_mergekits_cache(tiny_zoo, tmp_path):
    """A DoRA adapter is not W + scale·B·A: mergekit merges it into its LoRA cache, and the
    streamed pass still equals mergekit's merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_zoo["base"]
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                     target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(tmp_path / "dora")
    assert lora_updates(tmp_path / "dora", {"model.layers.0.self_attn.q_proj.weight"}) is None
    raw = _merge_config([str(tiny_zoo["ft1"]), f"{base}+{tmp_path / 'dora'}"], "task_arithmetic",
                        str(base))
    cache = tmp_path / "streamed-lora-cache"
    _assert_same(_streamed(raw, lora_cache=cache), _mergekit_logits(raw, tmp_path))
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 1  # the one merged copy


def test_a_tokenizer_section_is_refused_in_one_line(tiny_zoo):
    from mergekit_collapse.errors import BadInputError

    raw = {**_merge_config([str(tiny_zoo["ft1"]), str(tiny_zoo["ft2"])], "linear", None),
           "tokenizer_source": "union"}
    with pytest.raises(BadInputError, match="tokenizer section"):
        _streamed(raw)
    assert yaml.safe_dump(raw)


@pytest.mark.parametrize(("method", "by_rows"), [("linear", True), ("task_arithmetic", True),
                                                 ("ties", False), ("slerp", False)])
def test_memory_estimate_counts_what_is_merged_at_once(tiny_zoo, method, by_rows):
    """The estimate's largest merge: a layer's largest tensor under element-wise methods (larger
    ones go by rows), the embedding under the others; each input's copy and mergekit's
    intermediates counted, in the dtype mergekit merges in."""
    from mergekit.config import MergeConfiguration
    from safetensors import safe_open

    from mergekit_collapse.models.streamed import estimate_bytes

    refs = [str(tiny_zoo["ft1"]), str(tiny_zoo["ft2"])]
    merge = MergeConfiguration.model_validate(_merge_config(refs, method, str(tiny_zoo["base"])))
    with safe_open(str(tiny_zoo["base"] / "model.safetensors"), framework="pt") as f:
        numel = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 - not a dict
    sizes = {k: s[0] * (s[1] if len(s) > 1 else 1) for k, s in numel.items()}
    largest = max(n for k, n in sizes.items() if ".layers." in k)
    assert max(sizes.values()) > largest  # the embedding is the largest tensor here
    inputs = len(merge.referenced_models())  # ft1, ft2, and the base where the method has one
    got = estimate_bytes(merge, dtype_bytes=4, activations=0)
    assert got["tensor"] == (largest if by_rows else max(sizes.values())) * 4 * (2 * inputs + 2)
    assert got["total"] == got["tensor"] + got["layer"] + got["outside"]
