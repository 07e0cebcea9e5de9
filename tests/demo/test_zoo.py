"""The zoo: seeded task generators (checked independently), shipped data, lm-eval YAMLs, adapters,
scores, export, the training loop's reproducibility, and the demo config."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from mergekit_collapse.demo import zoo
from mergekit_collapse.demo.zoo.taskfiles import N_TEST, N_TRAIN, SEED, read_jsonl, write_data
from mergekit_collapse.demo.zoo.tasks import ALL_TASKS, GEMMA_TASKS, TASKS, TASKS_DEF, generate
from mergekit_collapse.errors import BadInputError

REPO = Path(__file__).resolve().parents[2]

# --- independent answer checks: each recomputes the answer from the input text ------------------

_POSITIVE_HINTS = {"buy it again", "exceeded", "loves it", "every penny", "recommend it to",
                   "arrived early"}
_TOPIC_HINTS = {"sports": ("scored", "league", "world record", "club", "match"),
                "politics": ("tax bill", "elections", "vetoed", "confidence", "coalition"),
                "science": ("species", "neutrino", "telescope", "genome", "entanglement"),
                "business": ("profits", "interest rates", "merger", "jobs", "stock exchange")}
_CONTINENT_SPOT = {"Japan": "Asia", "Kenya": "Africa", "Peru": "South America", "Fiji": "Oceania",
                   "Canada": "North America", "Poland": "Europe", "Chile": "South America",
                   "Mongolia": "Asia", "Egypt": "Africa", "Samoa": "Oceania"}
_ANIMAL_SPOT = {"dog": "mammal", "whale": "mammal", "penguin": "bird", "bat": "mammal",
                "shark": "fish", "eel": "fish", "turtle": "reptile", "cobra": "reptile",
                "bee": "insect", "butterfly": "insect", "ostrich": "bird", "dolphin": "mammal"}
_FOOD_SPOT = {"apple": "fruit", "carrot": "vegetable", "rice": "grain", "milk": "dairy",
              "bacon": "meat", "pumpkin": "vegetable", "feta": "dairy", "quinoa": "grain",
              "steak": "meat", "kiwi": "fruit", "corn": "grain", "garlic": "vegetable"}
_WORD_SPOT = {"fromage": "French", "Käse": "German", "queso": "Spanish", "cheese": "English",
              "Wald": "German", "bosque": "Spanish", "forêt": "French", "forest": "English"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _check(task: str, inp: str, answer: str) -> bool:
    if task == "sentiment":
        return answer == ("positive" if any(h in inp for h in _POSITIVE_HINTS) else "negative")
    if task == "topic":
        return any(h in inp for h in _TOPIC_HINTS[answer])
    if task == "word_language":
        word = re.sub(r'^(Word: |What language is ")|"\?$', "", inp)
        if word in _WORD_SPOT:
            return answer == _WORD_SPOT[word]
        return (answer == "German") == word[0].isupper()  # only German nouns are capitalised here
    if task == "continent":
        hit = [c for c in _CONTINENT_SPOT if re.search(rf"\b{c}\b", inp)]
        return answer == _CONTINENT_SPOT[hit[0]] if hit else answer in TASKS_DEF[task].choices
    if task in ("animal", "food"):
        spot = _ANIMAL_SPOT if task == "animal" else _FOOD_SPOT
        hit = [k for k in spot if re.search(rf"(^|[ :]){k}(\?|$)", inp)]
        return answer == spot[hit[0]] if hit else answer in TASKS_DEF[task].choices
    if task == "reverse_digits":
        return answer.split() == inp.split()[::-1]
    if task == "sort_digits":
        return answer.split() == sorted(inp.split())
    if task == "multiply_evens":
        return int(answer) == math.prod(n for n in _ints(inp) if n % 2 == 0)
    if task == "next_letter":
        return answer.split() == [chr((ord(c) - 97 + 1) % 26 + 97) for c in inp.split()]
    if task == "arithmetic":
        a, op, b = inp.split()
        return op == "+" and int(answer) == int(a) + int(b)
    if task == "temperature":
        t = float(inp.split()[0])
        return answer == ("cold" if t < 10 else "mild" if t < 25 else "hot")
    if task == "compare_numbers":
        a, b = _ints(inp)
        return answer == ("first" if a > b else "second")
    if task == "time_of_day":
        hour = int(inp.split(":")[0])
        return answer == {h: p for p, hs in (("night", range(0, 5)), ("morning", range(5, 12)),
                                             ("afternoon", range(12, 17)),
                                             ("evening", range(17, 21)),
                                             ("night", range(21, 24))) for h in hs}[hour]
    if task == "season":
        month = inp.split()[0]
        return answer == ("winter" if month in ("December", "January", "February") else
                          "spring" if month in ("March", "April", "May") else
                          "summer" if month in ("June", "July", "August") else "autumn")
    if task == "last_word":
        return answer == inp.rstrip(".").split()[-1].lower()
    if task == "count_words":
        return int(answer) == len(inp.split())
    if task == "date_iso":
        import datetime

        return answer == datetime.datetime.strptime(inp, "%B %d, %Y").date().isoformat()
    if task == "max_number":
        return int(answer) == max(_ints(inp))
    if task == "json_record":
        rec = json.loads(answer)
        return (list(rec) == ["name", "age", "city"] and rec["name"].isupper()
                and rec["city"].isupper() and rec["name"].title() in inp
                and rec["city"].title() in inp and str(rec["age"]) in inp)
    raise AssertionError(task)


def test_at_least_twelve_tasks_of_both_kinds() -> None:
    assert len(TASKS) >= 12
    kinds = {TASKS_DEF[t].kind for t in TASKS}
    assert kinds == {"choice", "generate"}


def test_gemma_zoo_has_eight_other_tasks_of_both_kinds() -> None:
    assert len(GEMMA_TASKS) >= 8 and not set(GEMMA_TASKS) & set(TASKS)
    assert {TASKS_DEF[t].kind for t in GEMMA_TASKS} == {"choice", "generate"}
    assert set(ALL_TASKS) == set(TASKS) | set(GEMMA_TASKS)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_generator_seeded_and_answers_correct(task: str) -> None:
    a = generate(task, n_train=60, n_test=30, seed=3)
    assert a == generate(task, n_train=60, n_test=30, seed=3)
    assert a != generate(task, n_train=60, n_test=30, seed=4)
    for ex in a[0] + a[1]:
        assert _check(task, ex["input"], ex["answer"]), ex
        assert ex["prompt"].endswith(ex["input"]) and ex["prompt"].startswith(
            TASKS_DEF[task].instruction)
        if TASKS_DEF[task].kind == "choice":
            assert ex["choices"][ex["label"]] == ex["answer"]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_shipped_data_held_out_and_checked(task: str) -> None:
    train = read_jsonl(zoo.data_path(task, "train"))
    test = read_jsonl(zoo.data_path(task, "test"))
    assert len(train) == N_TRAIN and 100 <= len(test) <= N_TEST
    assert not {e["input"] for e in train} & {e["input"] for e in test}
    assert len({e["input"] for e in test}) == len(test)
    entity = TASKS_DEF[task].entity
    if entity is not None:  # small input spaces: the test entities are unseen in training
        assert not {entity(e["input"]) for e in train} & {entity(e["input"]) for e in test}
    for ex in train[:200] + test:
        assert _check(task, ex["input"], ex["answer"]), ex


def test_shipped_data_is_regenerated_bit_for_bit(tmp_path: Path) -> None:
    write_data(tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=SEED)
    for task in ALL_TASKS:
        for split in ("train", "test"):
            assert (tmp_path / task / f"{split}.jsonl").read_bytes() == zoo.data_path(
                task, split).read_bytes(), (task, split)


def test_task_yamls_load_offline_in_lm_eval(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    folder = zoo.task_yamls(tmp_path / "yamls")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    names = {zoo.eval_name(t) for t in ALL_TASKS}
    assert names <= set(manager.all_tasks) and zoo.EVAL_TAG in manager.all_tasks
    loaded = manager.load_task_or_group(["zoo_animal", "zoo_json_record"])
    docs = list(loaded["zoo_animal"].test_docs())
    assert docs[0]["prompt"] == read_jsonl(zoo.data_path("animal"))[0]["prompt"]
    assert loaded["zoo_json_record"].config.output_type == "generate_until"


def test_unknown_task_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="unknown zoo task"):
        zoo.adapter_path("no_such_task")
    with pytest.raises(BadInputError, match="split"):
        zoo.data_path("animal", "validation")


def _trained(family: str = "smollm2") -> list[str]:
    return [t for t in zoo.FAMILY_TASKS[family]
            if (zoo.ADAPTER_DIRS[family] / t / "adapter_model.safetensors").is_file()]


@pytest.mark.parametrize("family", ["smollm2", "gemma3"])
def test_shipped_adapters_are_small_fp16_loras(family: str) -> None:
    from safetensors import safe_open

    from mergekit_collapse.demo.base_model import FAMILIES

    tasks = _trained(family)
    assert len(tasks) >= 8, "adapters missing"
    for task in tasks:
        path = zoo.adapter_path(task)
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == FAMILIES[family].hub_id and cfg["r"] == 8
        assert sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        weights = path / "adapter_model.safetensors"
        assert weights.stat().st_size < 4_000_000
        with safe_open(str(weights), framework="pt") as st:
            assert {str(st.get_tensor(k).dtype) for k in st.keys()} == {"torch.float16"}  # noqa: SIM118


@pytest.mark.parametrize("family", ["smollm2", "gemma3"])
def test_every_adapter_clearly_beats_the_base(family: str) -> None:
    scores = json.loads(zoo.SCORES_FILES[family].read_text())
    assert scores["limit"] and scores["apply_chat_template"] is True
    for task in _trained(family):
        s = scores["tasks"][task]
        assert s["adapter"] >= max(s["base"] + 0.15, 0.7), (task, s)


def test_training_is_seeded_and_reproducible(tiny_zoo: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mergekit_collapse.demo.zoo.train import TrainSettings, train_adapter

    settings = TrainSettings(min_steps=2, max_steps=2, check_every=1, n_val=8, batch_size=4,
                             threads=1)
    runs = [train_adapter("arithmetic", tiny_zoo["base"], tmp_path / f"run{i}", settings=settings)
            for i in (0, 1)]
    assert runs[0].steps == 2 and 0.0 <= runs[0].val_exact_match <= 1.0
    a, b = (load_file(tmp_path / f"run{i}" / "adapter_model.safetensors") for i in (0, 1))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # it learned


def test_answer_only_logits_match_the_full_head(tiny_zoo: dict[str, Path]) -> None:
    """The loss and exact match over the answer positions equal those of the full logits."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_collapse.demo.zoo.train import (
        _batch,
        _loss,
        encode_example,
        teacher_forced_exact_match,
    )

    tok = AutoTokenizer.from_pretrained(tiny_zoo["base"])
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo["base"], dtype=torch.float32).eval()
    rows = [encode_example(tok, p, a)
            for p, a in (("1 + 2", "3"), ("Sort 3 1", "1 3"), ("hi", "hello there"))]
    ids, mask, labels = _batch(rows, tok.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    full = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)
    with torch.no_grad():
        assert torch.allclose(_loss(model, ids, mask, labels), full, atol=1e-5)
    gold = labels[:, 1:]
    hits = ((logits.argmax(-1) == gold) | (gold == -100)).all(dim=1).float().mean().item()
    assert teacher_forced_exact_match(model, rows, tok.pad_token_id) == pytest.approx(hits)


def test_end_of_turn_is_read_from_the_chat_template(tiny_zoo: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from mergekit_collapse.demo.base_model import GEMMA_CHAT_TEMPLATE
    from mergekit_collapse.demo.zoo.train import encode_example, end_of_turn, format_prompt

    tok = AutoTokenizer.from_pretrained(tiny_zoo["base"])
    assert end_of_turn(tok) == "</s>"
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    assert end_of_turn(tok) == "<end_of_turn>"
    assert format_prompt(tok, "hi") == ("<s><start_of_turn>user\nhi<end_of_turn>\n"
                                        "<start_of_turn>model\n")
    ids, start = encode_example(tok, "hi", "yo")
    assert tok.decode(ids[start:]) == "yo<end_of_turn>"


def test_export_lays_out_models_and_tasks(tiny_zoo: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mergekit_collapse.demo import base_model

    tasks = _trained()[:2]
    monkeypatch.setattr(base_model, "ensure_base", lambda *a, **k: tiny_zoo["base"])
    out = zoo.export_zoo(tmp_path / "z", tasks=tasks)
    assert (out / "smollm2" / "config.json").is_file()
    for task in tasks:
        assert (out / "adapters" / task / "adapter_model.safetensors").is_file()
    for task in ALL_TASKS:
        spec = json.dumps(__import__("yaml").safe_load(
            (out / "tasks" / f"{zoo.eval_name(task)}.yaml").read_text()))
        assert str(out / "tasks" / task / "test.jsonl") in spec
        assert (out / "tasks" / task / "test.jsonl").is_file()


def test_demo_config_parses_with_guard_tasks() -> None:
    from mergekit_collapse.guard.config import load_config

    cfg = load_config(REPO / "merge_configs" / "demo.yml")
    assert len(cfg.models) >= 4
    for model in cfg.models:
        spec = cfg.task_of(model)
        # the task YAML the zoo export writes, so `evaluate` needs no include path
        assert spec.name in TASKS and spec.eval.endswith(f"tasks/{zoo.eval_name(spec.name)}.yaml")
        probe = cfg.resolve(spec.probes.file)
        assert (probe.parts[-3:] == ("tasks", spec.name, "test.jsonl")
                and spec.probes.field == "prompt")
        assert spec.name in _trained()
