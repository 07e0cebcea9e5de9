"""Tiny real models for tests: a byte-level tokenizer, random Llamas, perturbed fine-tunes, peft
LoRAs; a guarded config over them (`tiny_config`); hand-computable calibration records."""

from __future__ import annotations

from pathlib import Path

from mergekit_collapse.runtime import Runtime

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) built offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(path: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, intermediate: int = 64,
                    vocab: int | None = None) -> Path:
    """Save a random LlamaForCausalLM (safetensors) with the byte tokenizer to `path` (`vocab`:
    an embedding larger than the tokenizer, as padded vocabularies are)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=intermediate, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def make_finetune(base: str | Path, path: str | Path, seed: int, scale: float = 0.02) -> Path:
    """A 'full fine-tune' of `base`: every weight perturbed by scale * N(0, 1) noise (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


def make_lora(base: str | Path, path: str | Path, seed: int, r: int = 4, scale: float = 0.3,
              targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> Path:
    """A peft LoRA adapter for `base` with random (non-zero) A and B matrices (seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0,
                     init_lora_weights=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn_like(p))
    path = Path(path)
    peft_model.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_tasks(root: Path) -> Path:
    """Two tiny local lm-eval tasks: `tiny_mc` (2-way multiple choice) and `tiny_gen` (exact
    match)."""
    import json

    import yaml

    root = Path(root)
    rows = [{"prompt": f"Is {i} even or odd?", "choices": ["even", "odd"], "label": i % 2,
             "answer": ["even", "odd"][i % 2]} for i in range(6)]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": "{{prompt}}", "metadata": {"version": 1}}
    mc = {"task": "tiny_mc", "output_type": "multiple_choice", "doc_to_choice": "choices",
          "doc_to_target": "label", "metric_list": [{"metric": "acc"}], **common}
    gen = {"task": "tiny_gen", "output_type": "generate_until", "doc_to_target": "answer",
           "generation_kwargs": {"until": ["</s>"], "max_gen_toks": 3, "do_sample": False},
           "metric_list": [{"metric": "exact_match"}], **common}
    yamls = root / "tasks"
    yamls.mkdir()
    (yamls / "tiny_mc.yaml").write_text(yaml.safe_dump(mc))
    (yamls / "tiny_gen.yaml").write_text(yaml.safe_dump(gen))
    return yamls


def merge_with_mergekit(config_path: Path, out: Path, cache: Path) -> Path:
    """Run mergekit's own run_merge on a YAML (guard section and all), CPU, LoRAs merged into
    cache."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    source = Path(config_path).read_text()
    raw = yaml.safe_load(source)
    raw.pop("guard", None)
    run_merge(MergeConfiguration.model_validate(raw), str(out),
              options=MergeOptions(lora_merge_cache=str(cache), copy_tokenizer=True, quiet=True),
              config_source=source)
    return Path(out)


#: the runtime of most tests: no progress bars (float32: exact comparisons)
QUIET = Runtime(progress=False)
QUIET32 = Runtime(dtype="float32", progress=False)

PROBES = ["alpha beta", "gamma delta epsilon", "zeta eta", "one two three", "four five", "x y z",
          "merge the models", "what is the capital"]


def tiny_config(tmp_path, zoo, models=("ft1", "ft2", "ft3"), **guard):
    """A guarded task_arithmetic config over tiny-zoo models (two probes each), written to
    `tmp_path/config.yml`; `guard` keys go into its `guard:` section."""
    import yaml

    refs = [str(zoo[m]) if "lora" not in m else f"{zoo['base']}+{zoo[m]}" for m in models]
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [{"model": r, "parameters": {"weight": 0.5}} for r in refs],
        "dtype": "float32",
        "guard": {"tasks": {r: {"name": m, "probes": PROBES[2 * i: 2 * i + 2]}
                            for i, (r, m) in enumerate(zip(refs, models, strict=True))},
                  "k": 2, **guard},
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# collapsed (loss < −30) rows have x ∈ {.3, .5, .6, .8}; the others x ∈ {.1, .2, .4, .7}
X = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
LOSS = [-5, -10, -40, -8, -50, -60, -20, -70]
NOISE = [1, 2, 1, 2, 1, 2, 1, 2]  # AUROC exactly .5


def calibration_csv(path: Path | None = None) -> str:
    """Hand-computable calibration records (CSV): 8 rows, x against loss (see X, LOSS)."""
    lines = ["group,task,method,model,loss,x,exact_rel,noise"]
    for i, (x, loss, n) in enumerate(zip(X, LOSS, NOISE, strict=True)):
        lines.append(f"g{i // 2},t{i % 4},linear,m{i},{loss},{x},{2 * x},{n}")
    text = "\n".join(lines) + "\n"
    if path is not None:
        path.write_text(text)
    return text
