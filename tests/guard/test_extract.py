"""Hidden-state extraction on tiny real Llamas: adapter swap, layers, pooling, cache, safety."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from mergekit.common import ModelReference
from peft import PeftModel

from mergekit_collapse.errors import BadInputError
from mergekit_collapse.guard.extract import extract
from mergekit_collapse.guard.forward import (
    ExtractionSettings,
    encode_probes,
    forward_pooled,
    run_forward,
    shared_prefix_length,
)
from mergekit_collapse.models.loading import _load_converted, load_causal_lm, load_tokenizer

TEXTS = ["hello world", "the quick brown fox jumps over", "2+2=", "a", "merge me gently"]


def ref(text: str) -> ModelReference:
    return ModelReference.model_validate(text)


def merged_adapter_vectors(base, lora, settings):
    model = load_causal_lm(base, settings, "cpu", torch.float32)
    merged = PeftModel.from_pretrained(model, lora).merge_and_unload()
    tok = load_tokenizer(base, settings)
    return forward_pooled(merged.get_decoder(), encode_probes(tok, TEXTS, settings), settings,
                          tok.pad_token_id, share_prefix=False)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_adapter_swap_equals_merged_adapter(tiny_zoo, pooling):
    s = ExtractionSettings(pooling=pooling, batch_size=2, dtype="float32")
    base = tiny_zoo["base"]
    refs = [ref(f"{base}+{tiny_zoo[f'lora{i}']}") for i in (1, 2, 3)]
    ext = extract([ref(str(base)), *refs], TEXTS, s, progress=False)
    for i, r in zip((1, 2, 3), refs, strict=True):
        want = merged_adapter_vectors(base, tiny_zoo[f"lora{i}"], s)
        np.testing.assert_allclose(ext.vectors[str(r)], want, atol=1e-4, rtol=1e-4)
    # the plain base was computed before any adapter was injected
    assert np.abs(ext.vectors[str(base)] - ext.vectors[str(refs[0])]).max() > 1e-2
    # the chat template's opening ran once per model (4 of them), not once per probe
    ids = encode_probes(load_tokenizer(base, s), TEXTS, s)
    saved = 4 * (len(TEXTS) - 1) * shared_prefix_length(ids)
    assert saved > 0 and ext.tokens_saved == saved
    assert ext.tokens_computed == 4 * sum(map(len, ids)) - saved


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_intermediate_layer_matches_output_hidden_states(tiny_zoo, layer):
    s = ExtractionSettings(layer=layer, pooling="mean", dtype="float32")
    ext = extract([ref(str(tiny_zoo["ft1"]))], TEXTS[:1], s, progress=False)
    model = load_causal_lm(tiny_zoo["ft1"], s, "cpu", torch.float32)
    tok = load_tokenizer(tiny_zoo["ft1"], s)
    ids = torch.tensor(encode_probes(tok, TEXTS[:1], s))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(ext.vectors[str(tiny_zoo["ft1"])][0], hs[layer][0].mean(0).numpy(),
                               atol=1e-5)


def test_padding_does_not_change_vectors(tiny_zoo):
    r = ref(str(tiny_zoo["ft2"]))
    batched = extract([r], TEXTS, ExtractionSettings(batch_size=8, dtype="float32"), progress=False)
    alone = [extract([r], [t], ExtractionSettings(batch_size=1, dtype="float32"), cache_dir=None,
                     progress=False).vectors[str(r)][0] for t in TEXTS]
    np.testing.assert_allclose(batched.vectors[str(r)], np.stack(alone), atol=1e-5)


def test_cache_recomputes_only_what_is_missing(tiny_zoo):
    s = ExtractionSettings()
    a, b, c = (ref(str(tiny_zoo[k])) for k in ("ft1", "ft2", "ft3"))
    first = extract([a, b], TEXTS, s, progress=False)
    assert first.computed == {str(a): 5, str(b): 5}
    again = extract([a, b], TEXTS, s, progress=False)
    assert again.computed == {str(a): 0, str(b): 0}
    np.testing.assert_array_equal(again.vectors[str(a)], first.vectors[str(a)])
    added = extract([a, b, c], TEXTS, s, progress=False)  # one model added: only it runs
    assert added.computed == {str(a): 0, str(b): 0, str(c): 5}
    more = extract([a, b, c], [*TEXTS, "a new task's probe"], s, progress=False)
    assert more.computed == {str(a): 1, str(b): 1, str(c): 1}  # only the new probe
    other_layer = extract([a], TEXTS, ExtractionSettings(layer=1), progress=False)
    assert other_layer.computed == {str(a): 5}  # settings are part of the key


def test_pickle_only_weights_refused(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    AutoModelForCausalLM.from_pretrained(tiny_zoo["ft1"]).save_pretrained(
        folder, safe_serialization=False)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    if not list(folder.glob("*.bin")):  # this transformers always writes safetensors
        torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(BadInputError, match="pickle"):
        extract([ref(str(folder))], TEXTS, ExtractionSettings(), progress=False)


def test_mismatched_hidden_sizes(tiny_zoo, tmp_path):
    from common import make_tiny_llama

    wide = make_tiny_llama(tmp_path / "wide", hidden=48)
    with pytest.raises(BadInputError, match="hidden sizes differ"):
        extract([ref(str(tiny_zoo["ft1"])), ref(str(wide))], TEXTS, ExtractionSettings(),
                progress=False)


def test_nan_weights_are_bad_input(tiny_zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(tiny_zoo["ft1"], folder)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "layers.0.self_attn.q_proj" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInputError, match="NaN"):
        extract([ref(str(folder))], TEXTS, ExtractionSettings(), progress=False)


def test_missing_model_is_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="not a local folder"):
        extract([ref(str(tmp_path / "nope"))], TEXTS, ExtractionSettings(), progress=False)


@pytest.mark.parametrize("layer", [-1, 1])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_shared_prefix_equals_unshared(tiny_zoo, pooling, layer):
    s = ExtractionSettings(layer=layer, pooling=pooling, batch_size=2, dtype="float32")
    model = PeftModel.from_pretrained(load_causal_lm(tiny_zoo["base"], s, "cpu", torch.float32),
                                      tiny_zoo["lora1"])
    body = model.get_base_model().get_decoder()
    ids = encode_probes(load_tokenizer(tiny_zoo["base"], s),
                 [f"Answer in one word. {t}" for t in TEXTS], s)
    ids.append(ids[0][: shared_prefix_length(ids)])  # a probe that is all prefix
    prefix = shared_prefix_length(ids)
    assert prefix == len(ids[-1]) - 1 > 10  # one token of its own left to the last probe
    shared, tokens = run_forward(body, ids, s, 0)
    assert tokens == sum(map(len, ids)) - (len(ids) - 1) * prefix
    whole, tokens = run_forward(body, ids, s, 0, share_prefix=False)
    assert tokens == sum(map(len, ids))
    np.testing.assert_allclose(shared, whole, atol=1e-5, rtol=1e-5)


def test_cache_that_cannot_be_shared_runs_whole():
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, sliding_window=4)
    body = AutoModelForCausalLM.from_config(cfg).eval().get_decoder()
    ids = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 9, 10], [1, 2, 3, 4, 5, 6, 11, 12, 13]]
    s = ExtractionSettings(pooling="mean")
    vectors, tokens = run_forward(body, ids, s, 0)
    assert tokens == sum(map(len, ids))  # sliding-window layers: no shared prefix
    np.testing.assert_array_equal(vectors, forward_pooled(body, ids, s, 0, share_prefix=False))


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_load_converts_like_transformers(tiny_zoo, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    folder = tiny_zoo["base"]
    if tied:
        folder = tmp_path / "tied"
        model = AutoModelForCausalLM.from_pretrained(tiny_zoo["base"])
        model.config.tie_word_embeddings = True
        model.tie_weights()
        model.save_pretrained(folder)
    s = ExtractionSettings()
    assert _load_converted(folder, s, torch.float32) is None  # stored dtype: transformers maps it
    ours = _load_converted(folder, s, torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    want = theirs.state_dict()
    assert ours.state_dict().keys() == want.keys()
    for name, tensor in ours.state_dict().items():
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name
    assert (ours.lm_head.weight is ours.get_input_embeddings().weight) is tied
    assert ours.generation_config.eos_token_id == theirs.generation_config.eos_token_id
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=0, rtol=0)
