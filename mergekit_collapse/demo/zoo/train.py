"""Train a zoo: one seeded LoRA adapter per task on SmolLM2-135M-Instruct or Gemma 3 270M, on CPU.

Training format == evaluation format == probe format: the task's user message wrapped in the
tokenizer's chat template with the generation prompt, followed by the answer and the template's
end of turn (`<|im_end|>`, `<end_of_turn>`); the loss covers only those tokens (and only their
logits are computed: Gemma's 262k-token head is most of its cost). Training stops once greedy
exact match on a held-aside validation slice reaches the target (checked every few steps,
teacher-forced: one forward pass gives the greedy answer exactly), or at `max_steps`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergekit_collapse.demo.base_model import HUB_ID
from mergekit_collapse.demo.zoo.taskfiles import DATA_DIR, read_jsonl
from mergekit_collapse.demo.zoo.tasks import ALL_TASKS
from mergekit_collapse.errors import BadInputError

logger = logging.getLogger(__name__)

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainSettings:
    """Hyper-parameters of one adapter (the defaults trained the shipped zoo)."""

    seed: int = 0
    rank: int = 8
    alpha: int = 16
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 5
    min_steps: int = 20
    max_steps: int = 120
    check_every: int = 10
    n_val: int = 128
    target: float = 0.97
    threads: int = 1
    bf16: bool = True

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> TrainSettings:
        """The settings that trained a family's shipped zoo. Gemma trains in fp32: CPU autocast
        to bf16 re-casts its 262k-token embedding every step (measured 60x slower per step)."""
        if family == "gemma3":
            overrides = {"bf16": False, "n_val": 64, **overrides}
        return cls(**overrides)


@dataclass
class TrainResult:
    """What one training run did."""

    task: str
    steps: int
    val_exact_match: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The user message in the chat template, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def end_of_turn(tokenizer: Any) -> str:
    """What the chat template writes right after an assistant's message (`<|im_end|>` for
    SmolLM2)."""
    marker = "\x00ANSWER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": marker}], tokenize=False)
    return text.split(marker, 1)[1].strip()


def encode_example(tokenizer: Any, prompt: str, answer: str,
           end: str | None = None) -> tuple[list[int], int]:
    """Token ids of prompt + answer + end of turn, and where the answer starts.

    Splits like lm-eval does: the context's own encoding fixes the boundary in the whole encoding.
    """
    ctx = format_prompt(tokenizer, prompt)
    end = end_of_turn(tokenizer) if end is None else end
    whole = tokenizer(ctx + answer + end, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(ctx, add_special_tokens=False)["input_ids"])
    return whole, n_ctx


def _batch(rows: list[tuple[list[int], int]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (seq, start) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start: len(seq)] = torch.tensor(seq[start:])
    return ids, mask, labels


def _answer_logits(model: Any, ids, mask, labels):
    """(logits, gold ids, row) at each position that predicts an answer token; the LM head runs
    there only."""
    import torch

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    gold = labels[:, 1:]
    keep = gold != -100
    logits = causal.lm_head(hidden[keep]).float()
    cap = getattr(causal.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, gold[keep], keep.nonzero()[:, 0]


def _loss(model: Any, ids, mask, labels):
    import torch.nn.functional as F

    logits, gold, _ = _answer_logits(model, ids, mask, labels)
    return F.cross_entropy(logits, gold)


def teacher_forced_exact_match(model: Any, rows: list[tuple[list[int], int]], pad_id: int,
                               batch_size: int = 32) -> float:
    """Share of rows whose every answer token (and the end token) is the greedy argmax."""
    import torch

    hits = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids, mask, labels = _batch(rows[i: i + batch_size], pad_id)
            logits, gold, row = _answer_logits(model, ids, mask, labels)
            wrong = torch.zeros(ids.shape[0], dtype=torch.long)
            wrong.index_add_(0, row, (logits.argmax(-1) != gold).long())
            hits += int((wrong == 0).sum())
    return hits / max(len(rows), 1)


def train_adapter(task: str, base: str | Path, out_dir: str | Path, *,
                  settings: TrainSettings | None = None, data_dir: str | Path = DATA_DIR,
                  hub_id: str = HUB_ID, log: Callable[[str], None] = logger.info) -> TrainResult:
    """Train one LoRA adapter for `task` and save it as fp16 safetensors in `out_dir`.

    Args:
        task: a zoo task name.
        base: folder of the base model (see `ensure_base`).
        out_dir: where `adapter_config.json` and `adapter_model.safetensors` go.
        settings: hyper-parameters; the defaults trained the shipped zoo.
        data_dir: folder with `<task>/train.jsonl`; its last `n_val` rows are held aside.
        hub_id: the base's Hub id, recorded in the adapter's config.
        log: progress sink.

    Returns:
        The steps taken, the final validation exact match, the time and the history.

    Raises:
        BadInputError: unknown task or missing data.
    """
    import torch

    s = settings or TrainSettings()
    path = _train_file(task, data_dir)
    torch.set_num_threads(s.threads)
    random.seed(s.seed)
    torch.manual_seed(s.seed)

    pad_id, train_rows, val_rows = _training_rows(base, path, s.n_val)
    model, params, opt, sched = _lora_model(base, s)
    order_rng = random.Random(s.seed)
    order: list[int] = []
    history: list[dict[str, float]] = []
    start = time.time()
    val_em, step = 0.0, 0
    while step < s.max_steps:
        if len(order) < s.batch_size:
            more = list(range(len(train_rows)))
            order_rng.shuffle(more)
            order += more
        batch, order = [train_rows[i] for i in order[: s.batch_size]], order[s.batch_size:]
        loss = _train_step(model, batch, pad_id, params, opt, sched, s.bf16)
        step += 1
        if not math.isfinite(loss.item()):
            raise BadInputError(f"{task}: loss became {loss.item()} at step {step}")
        if step >= s.min_steps and (step % s.check_every == 0 or step == s.max_steps):
            val_em = _validate(model, val_rows, pad_id, s.bf16)
            history.append({"step": step, "loss": loss.item(), "val_exact_match": val_em,
                            "seconds": time.time() - start})
            log(f"{task} step {step} loss {loss.item():.4f} val_em {val_em:.3f} "
                f"({time.time() - start:.0f}s)")
            if val_em >= s.target:
                break
    seconds = time.time() - start
    save_adapter(model, out_dir, hub_id)
    result = TrainResult(task, step, val_em, seconds, history)
    meta = {"settings": asdict(s), **asdict(result)}
    (Path(out_dir) / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    return result


def _train_file(task: str, data_dir: str | Path) -> Path:
    """`<data_dir>/<task>/train.jsonl`, for a zoo task that has one (else BadInputError)."""
    if task not in ALL_TASKS:
        raise BadInputError(f"unknown zoo task '{task}'; choose from {', '.join(ALL_TASKS)}")
    path = Path(data_dir) / task / "train.jsonl"
    if not path.is_file():
        raise BadInputError(f"missing training data {path}")
    return path


def _training_rows(base: str | Path, path: Path, n_val: int
                   ) -> tuple[int, list[tuple[list[int], int]], list[tuple[list[int], int]]]:
    """(pad id, training rows, the last `n_val` rows held aside), by the base's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else tokenizer.eos_token_id)
    end = end_of_turn(tokenizer)
    rows = [encode_example(tokenizer, r["prompt"], r["answer"], end) for r in read_jsonl(path)]
    return pad_id, rows[: -n_val], rows[-n_val:]


def _lora_model(base: str | Path, s: TrainSettings) -> tuple[Any, list[Any], Any, Any]:
    """The base in fp32 with fresh LoRA layers: (model, trainable params, AdamW, warm-up)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=list(TARGET_MODULES),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / s.warmup))
    return model, params, opt, sched


def _train_step(model: Any, batch: list[tuple[list[int], int]], pad_id: int, params: list[Any],
                opt: Any, sched: Any, bf16: bool) -> Any:
    """One optimiser step on a batch (gradients clipped to norm 1); returns the loss tensor."""
    import torch

    ids, mask, labels = _batch(batch, pad_id)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = _loss(model, ids, mask, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _validate(model: Any, rows: list[tuple[list[int], int]], pad_id: int, bf16: bool) -> float:
    """Teacher-forced exact match on the held-out rows, in eval mode."""
    import torch

    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return teacher_forced_exact_match(model, rows, pad_id)

def save_adapter(peft_model: Any, out_dir: str | Path, hub_id: str = HUB_ID) -> Path:
    """Save a peft model's adapter as fp16 safetensors, its base recorded as `hub_id`."""
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    peft_model.peft_config["default"].base_model_name_or_path = hub_id
    # save_embedding_layers=False: only attention is adapted; skips peft's Hub look-up of the base
    peft_model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    weights = out / "adapter_model.safetensors"
    half = {k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}
    save_file(half, weights, metadata={"format": "pt"})
    readme = out / "README.md"
    if readme.exists():  # peft's boilerplate model card: not ours to ship
        readme.unlink()
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m mergekit_collapse.demo.zoo.train [--family F] [TASK ...]`: train into the
    package's adapter folder of that family."""
    import argparse

    from mergekit_collapse.demo.base_model import FAMILIES, ensure_base
    from mergekit_collapse.demo.zoo import ADAPTER_DIRS, FAMILY_TASKS

    ap = argparse.ArgumentParser()
    ap.add_argument("tasks", nargs="*")
    ap.add_argument("--family", choices=list(FAMILIES), default="smollm2")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--max-steps", type=int, default=TrainSettings.max_steps)
    ap.add_argument("--threads", type=int, default=TrainSettings.threads)
    ap.add_argument("--seed", type=int, default=TrainSettings.seed,
                    help="another seed trains another adapter of the same task (model soups)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = FAMILIES[args.family]
    base = ensure_base(spec)
    out = args.out or ADAPTER_DIRS[spec.name]
    for task in args.tasks or FAMILY_TASKS[spec.name]:
        res = train_adapter(task, base, out / task, hub_id=spec.hub_id, log=print,
                            settings=TrainSettings.for_family(spec.name, max_steps=args.max_steps,
                                                              threads=args.threads,
                                                              seed=args.seed))
        print(f"DONE {task} steps={res.steps} val_em={res.val_exact_match:.3f} "
              f"time={res.seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
