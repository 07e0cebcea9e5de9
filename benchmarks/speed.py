"""Speed, memory and efficiency of the guard on real SmolLM2-135M-Instruct (GitHub issue 7,
item 4).

One run, side by side, every measurement in its own subprocess (clean peak RSS, cold imports):

(a) the guard's hidden-state extraction vs the naive loop a user writes (per model
    `from_pretrained` + peft `merge_and_unload`, `output_hidden_states=True`, batch 1, the last
    token's final hidden state: the guard's default pooling) on 8 adapters x 40 probes: the
    guard in float32 (the naive loop's dtype: max |diff| of vectors) and at its default
    (bfloat16), cold cache, and a warm re-run.
(b) the whole guard (`check`, cold cache) vs mergekit's `run_merge` of the same config
    (`lora_merge_cache` cold, output in /dev/shm), for 8 adapters and for 4 full fine-tunes.
(c) peak RSS of the guard at N = 2, 8 vs one model's safetensors size; Python+torch baseline apart.
(d) scaling in N (random r=8 q/k/v/o LoRAs) at a fixed probe set: seconds per model, linear fit.
(e) conflict metrics streamed vs tests/naive_conflicts.py: time and peak RSS.
(f) extraction FLOP/s (2 x body parameters per real token) vs this machine's dense matmul
    throughput, float32 and bfloat16; the bf16 error in drms and r*^2 vs float32.
(g) the knobs behind (a)/(f): batch size, threads, merged vs unmerged LoRA, dtype.

    python benchmarks/speed.py [--quick] [--out benchmarks/speed.json] [--work /tmp/mkc-speed]

Real adapters come from the shipped zoo (`mergekit_collapse/zoo/adapters`); missing ones are random
peft-format LoRAs of the same shape (r=8, alpha=16, q/k/v/o, B scaled like the real ones).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: targets: (a) at defaults and (f) (issue 15); (b) guard with its rehearsal / merge and (c) above
#: the Python+torch baseline (issue 20)
TARGETS = {"a_speedup": 8.0, "b_ratio_lora": 1.0, "b_ratio_full": 3.0, "c_rss_ratio": 1.3,
           "f_fraction": 0.6}
#: where the workers run the models (--device); "cpu" unless a GPU run asks for "cuda"
DEVICE = {"value": "cpu"}


# ---------------------------------------------------------------- helpers (any process)


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (kB) in MB; None where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM). Not ru_maxrss: Linux carries the parent's peak across
    fork+exec into the child's ru_maxrss, so a child of a big parent reads the parent's peak."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _anon_mb() -> float:
    """Anonymous resident memory of this process now (RssAnon: heap and tensors; VmHWM also counts
    the file pages that memory-mapped safetensors keep resident, once per mapping)."""
    anon = _status_mb("RssAnon")
    return anon if anon is not None else float("nan")


def _above_baseline(res: dict[str, Any], baseline: dict[str, Any],
                    size_mb: float) -> dict[str, float]:
    """A worker's peak RSS and peak anonymous memory above the baseline worker's, in models."""
    return {"rss_above_baseline_per_model":
                (res["peak_rss_mb"] - baseline["peak_rss_mb"]) / size_mb,
            "anon_above_baseline_per_model":
                (res["peak_anon_mb"] - baseline["peak_anon_mb"]) / size_mb}


#: the memory rows of the table: (what, key)
MEMORY_ROWS = (("peak RSS", "rss_above_baseline_per_model"),
               ("peak anonymous memory", "anon_above_baseline_per_model"))


class _AnonPeak(threading.Thread):
    """The largest `_anon_mb` seen, sampled every 20 ms until `stop()` (torch releases the GIL
    in its kernels, so the samples go on during them; a shorter spike can be missed)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = _anon_mb(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, _anon_mb())

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, _anon_mb())


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _refs(spec: dict[str, Any], key: str) -> list[Any]:
    from mergekit.common import ModelReference

    return [ModelReference.parse(r) for r in spec[key]]


def _probe_texts(config: str) -> list[str]:
    from mergekit_collapse.guard.config import load_config
    from mergekit_collapse.guard.probes import build_probes

    return list(build_probes(load_config(config)).texts)


def _settings(**kw: Any) -> Any:
    from mergekit_collapse.guard.forward import ExtractionSettings

    return ExtractionSettings(**{"device": DEVICE["value"], **kw})


# ---------------------------------------------------------------- workers (one per subprocess)


def w_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """RSS of Python + torch + transformers + peft + the package, before any model is loaded."""
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import mergekit_collapse.guard.extract  # noqa: F401

    torch.ones(8) @ torch.ones(8)
    return {}


def w_extract(spec: dict[str, Any]) -> dict[str, Any]:
    """The guard's extraction (`extract`) of spec['refs'] on spec['texts'] into spec['cache']."""
    from mergekit_collapse.guard.extract import extract

    texts = spec["texts"]
    refs = _refs(spec, "refs")
    t0 = time.perf_counter()
    ext = extract(refs, texts, _settings(**spec.get("settings", {})), cache_dir=Path(spec["cache"]),
                  progress=False)
    dt = time.perf_counter() - t0
    if spec.get("save"):
        import numpy as np

        np.save(spec["save"], np.stack([ext.vectors[str(r)] for r in refs]))
    return {"seconds": dt, "computed": sum(ext.computed.values()),
            "tokens_computed": getattr(ext, "tokens_computed", None),
            "tokens_saved": getattr(ext, "tokens_saved", None)}


def w_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """What a user writes: load + merge each model, batch 1, output_hidden_states, last token."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    out = []
    for ref in spec["refs"]:
        base, _, lora = ref.partition("+")
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if lora:
            model = PeftModel.from_pretrained(model, lora).merge_and_unload()
        model.to(DEVICE["value"]).eval()
        vecs = []
        with torch.no_grad():
            for text in spec["texts"]:
                chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
                enc = tok(chat, return_tensors="pt", add_special_tokens=False).to(DEVICE["value"])
                hs = model(**enc, output_hidden_states=True).hidden_states[-1]
                vecs.append(hs[0, -1].float().cpu().numpy())
        out.append(np.stack(vecs))
        del model
    dt = time.perf_counter() - t0
    np.save(spec["save"], np.stack(out))
    return {"seconds": dt}


def w_check(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole guard: `check(config)` with the cache root in spec['cache'] (cold when fresh).

    The libraries are imported before the clock starts, as `w_merge` imports mergekit's: the two
    are timed from the same point (the interpreters' whole lives are `wall_s`)."""
    import mergekit.merge  # noqa: F401 - the libraries both sides import, outside the timing
    import peft  # noqa: F401

    from mergekit_collapse.guard.assess import check
    from mergekit_collapse.runtime import Runtime

    runtime = Runtime(device=DEVICE["value"], cache_dir=spec["cache"], progress=False)
    t0 = time.perf_counter()
    rep = check(spec["config"], runtime=runtime,
                **({"rehearse": spec["rehearse"]} if spec.get("rehearse") else {}))
    out = {"seconds": time.perf_counter() - t0, "verdict": str(rep.verdict),
           "rehearsal": rep.rehearsal.status if rep.rehearsal else None}
    if rep.run_info is not None:
        out["steps_s"] = rep.run_info.seconds
    if rep.rehearsal is not None and rep.rehearsal.reason:
        out["rehearsal_reason"] = rep.rehearsal.reason
    return out


def w_merge(spec: dict[str, Any]) -> dict[str, Any]:
    """mergekit's own run_merge of the config (guard section dropped), LoRA merge cache cold."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    raw = yaml.safe_load(Path(spec["config"]).read_text())
    raw.pop("guard", None)
    t0 = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(raw), spec["out"],
              options=MergeOptions(lora_merge_cache=spec["lora_cache"], copy_tokenizer=True,
                                   quiet=True, cuda=DEVICE["value"] == "cuda",
                                   lora_merge_dtype=spec.get("lora_merge_dtype")))
    return {"seconds": time.perf_counter() - t0}


def w_conflicts(spec: dict[str, Any]) -> dict[str, Any]:
    """Conflict metrics of spec['models'] vs spec['base'], streamed or naive (full loads)."""
    t0 = time.perf_counter()
    if spec["how"] == "streamed":
        from mergekit_collapse.analysis.conflicts import conflict_metrics

        rep = conflict_metrics(spec["models"], base=spec["base"])
        mats = {m: rep.metric(m) for m in ("magnitude_change_ratio", "sign_change_ratio",
                                           "conflicting_magnitude_ratio", "cosine_similarity")}
    else:
        sys.path.insert(0, str(ROOT / "tests"))  # the test oracle is the naive baseline
        from naive_conflicts import naive_conflict_metrics

        mats = naive_conflict_metrics(spec["models"], spec["base"])
    dt = time.perf_counter() - t0
    Path(spec["save"]).write_text(json.dumps(mats))
    return {"seconds": dt}


def w_flops(spec: dict[str, Any]) -> dict[str, Any]:
    """Extraction tokens/s on a loaded body vs the dense-matmul roofline, in one dtype.

    Also times the knobs: batch size, merged vs unmerged LoRA (spec['lora']), torch threads.
    """
    import torch
    from peft import PeftModel

    from mergekit_collapse.guard.forward import encode_probes, forward_pooled
    from mergekit_collapse.models.loading import load_causal_lm, load_tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    base = Path(spec["base"])
    texts = spec["texts"]
    dev = DEVICE["value"]
    st = _settings(dtype=spec["dtype"])
    tok = load_tokenizer(base, st)
    model = load_causal_lm(base, st, dev, dtype)
    body = model.get_decoder()
    body_params = sum(p.numel() for n, p in body.named_parameters() if "embed_tokens" not in n)
    ids = encode_probes(tok, texts, st)
    real_tokens = sum(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def timed(b: Any, batch: int, reps: int) -> tuple[float, Any]:
        s = _settings(dtype=spec["dtype"], batch_size=batch)
        forward_pooled(b, ids[:batch], s, pad)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            v = forward_pooled(b, ids, s, pad)
            best = min(best, time.perf_counter() - t0)
        return best, v

    reps = spec.get("reps", 2)
    res: dict[str, Any] = {"dtype": spec["dtype"], "body_params": body_params,
                           "real_tokens": real_tokens, "threads": torch.get_num_threads()}
    t_base, _ = timed(body, 16, reps)
    res["base_s"] = t_base
    # padded tokens in the guard's length-sorted batches of 16
    order = sorted(len(x) for x in ids)
    res["padded_tokens"] = sum(max(order[i:i + 16]) * len(order[i:i + 16])
                               for i in range(0, len(order), 16))
    # the guard's adapter path: unmerged LoRA on the shared base (peft), and merged weights
    peft_model = PeftModel.from_pretrained(model, spec["lora"], is_trainable=False)
    pbody = peft_model.get_base_model().get_decoder()
    res["lora_unmerged_s"], v_unmerged = timed(pbody, 16, reps)
    peft_model.merge_adapter()
    res["lora_merged_s"], v_merged = timed(pbody, 16, reps)
    res["merged_vs_unmerged_max_abs"] = float(abs(v_merged - v_unmerged).max())
    peft_model.unmerge_adapter()
    if spec.get("knobs"):
        for batch in spec["knobs"]["batch"]:
            res[f"lora_unmerged_batch{batch}_s"], _ = timed(pbody, batch, 1)
        nthreads = torch.get_num_threads()
        for th in spec["knobs"]["threads"]:
            torch.set_num_threads(th)
            res[f"lora_unmerged_threads{th}_s"], _ = timed(pbody, 16, 1)
        torch.set_num_threads(nthreads)
    flop = 2.0 * body_params * real_tokens
    res["extraction_flops_base"] = flop / t_base
    res["extraction_flops_lora"] = flop / res["lora_unmerged_s"]
    # the machine's own dense matmul, same dtype, shapes of the MLP up-projection of one batch
    tokens = max(16, res["padded_tokens"] // max(1, -(-len(ids) // 16)))
    h, m = model.config.hidden_size, model.config.intermediate_size
    x = torch.randn(tokens, h, dtype=dtype, device=dev)
    w = torch.randn(h, m, dtype=dtype, device=dev)
    y = torch.randn(tokens, m, dtype=dtype, device=dev)
    w2 = torch.randn(m, h, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    for _ in range(3):
        x @ w
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < spec.get("matmul_s", 2.0):
        x @ w
        y @ w2
        n += 1
        if n % 16 == 0:
            sync()
    sync()
    dt = time.perf_counter() - t0
    res["matmul_shape"] = f"({tokens}x{h})@({h}x{m}) + ({tokens}x{m})@({m}x{h})"
    res["matmul_flops"] = n * 2 * (2.0 * tokens * h * m) / dt
    res["fraction_base"] = res["extraction_flops_base"] / res["matmul_flops"]
    res["fraction_lora"] = res["extraction_flops_lora"] / res["matmul_flops"]
    return res


WORKERS = {f.__name__[2:]: f for f in (w_baseline, w_extract, w_naive, w_check, w_merge,
                                       w_conflicts, w_flops)}


def worker_main(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    DEVICE["value"] = spec.get("device", "cpu")
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    anon = _AnonPeak()
    anon.start()
    res = WORKERS[name](spec)
    res["peak_rss_mb"] = _rss_mb()
    res["peak_anon_mb"] = anon.stop()
    print("@@RESULT@@" + json.dumps(res))


#: OpenMP wait policy for the workers ("" = leave the environment as it is); set by
#: --omp-wait-policy
OMP_POLICY = {"value": ""}


def run(name: str, spec: dict[str, Any], work: Path,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; return its JSON result plus wall time and load."""
    spec_path = work / f"spec-{name}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps({"device": DEVICE["value"], **spec}))
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if OMP_POLICY["value"]:
        full_env["OMP_WAIT_POLICY"] = OMP_POLICY["value"]
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v != "<unset>"}
    load0 = _load()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--worker", name, str(spec_path)],
                       capture_output=True, text=True, env=full_env, cwd=ROOT)
    wall = time.perf_counter() - t0
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("@@RESULT@@")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"worker {name} failed:\n{p.stderr[-3000:]}")
    res = json.loads(line.removeprefix("@@RESULT@@"))
    res["wall_s"] = wall
    res["load_before"] = load0
    return res


# ---------------------------------------------------------------- setup


def random_lora(base: Path, out: Path, seed: int, like: Path | None) -> Path:
    """A peft LoRA folder (r=8, alpha=16, q/k/v/o) with random A, B; B's scale copied from
    `like`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cfg = json.loads((like / "adapter_config.json").read_text()) if like else {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "base_model_name_or_path": str(base)}
    if (out / "adapter_model.safetensors").is_file():
        return out  # made by an earlier run (same seed)
    b_std = 0.01
    if like:
        sd = load_file(str(like / "adapter_model.safetensors"))
        lora_b = torch.cat([v.flatten() for k, v in sd.items() if "lora_B" in k])
        b_std = float(lora_b.float().std())
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if not name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            continue
        module = "base_model.model." + name.removesuffix(".weight")
        out_f, in_f = shape
        tensors[f"{module}.lora_A.weight"] = torch.randn(8, in_f, generator=gen) / in_f ** 0.5
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_f, 8, generator=gen) * b_std
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def full_finetune(base: Path, out: Path, seed: int, rel: float = 0.01) -> Path:
    """A 'full fine-tune': every float tensor + rel * std(tensor) * N(0, 1) noise, as
    safetensors."""
    import torch
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").is_file():
        return out  # made by an earlier run (same seed)
    sd = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if v.is_floating_point():
            sd[k] = v + rel * v.float().std() * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    return out


def write_config(path: Path, base: Path, models: list[str], tasks: list[str], zoo: Path,
                 k: int) -> Path:
    """A task_arithmetic mergekit YAML with a guard section (probes from each task's test.jsonl)."""
    import yaml

    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
           "parameters": {"lambda": 1.0},
           "models": [{"model": m, "parameters": {"weight": 1.0 / len(models)}} for m in models],
           "guard": {"k": k, "tasks": {m: {"name": t, "probes": {
               "file": str(zoo / "tasks" / t / "test.jsonl"), "field": "prompt"}}
               for m, t in zip(models, tasks, strict=True)}}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def random_base(config_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random-initialised model of `config_dir`'s config.json, with its tokenizer files, for a
    machine without the converted SmolLM2 (the GPU run): the same arithmetic, meaningless
    vectors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir),
                                             dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="1000GB")
    for f in config_dir.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    return out


def setup(work: Path, n_scaling: int, n_full: int) -> dict[str, Any]:
    """Export the zoo; top up to 8 task adapters with random ones; scaling adapters; full copies."""
    from mergekit_collapse.demo.zoo import TASKS, export_zoo

    zoo = export_zoo(work / "zoo")
    base = zoo / "smollm2"
    real = [t for t in TASKS if (zoo / "adapters" / t / "adapter_model.safetensors").is_file()]
    like = zoo / "adapters" / real[0] if real else None
    tasks = list(TASKS[:8]) if len(real) >= 8 else (real + [t for t in TASKS if t not in real])[:8]
    adapters = []
    for i, t in enumerate(tasks):
        if t in real:
            adapters.append(zoo / "adapters" / t)
        else:
            adapters.append(random_lora(base, work / "random_task" / t, seed=100 + i, like=like))
    scaling = [random_lora(base, work / "random" / f"r{i:02d}", seed=1000 + i, like=like)
               for i in range(n_scaling)]
    full = [full_finetune(base, work / "full" / f"f{i}", seed=i) for i in range(n_full)]
    return {"zoo": str(zoo), "base": str(base), "tasks": tasks,
            "real": [t for t in tasks if t in real],
            "adapters": [str(a) for a in adapters], "scaling": [str(a) for a in scaling],
            "full": [str(f) for f in full],
            "size_bytes": (base / "model.safetensors").stat().st_size}


#: the mid-size case (issue 20): a random Llama of about 1.1B parameters (TinyLlama's shape)
MID = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
       "num_attention_heads": 32, "num_key_value_heads": 4, "tie_word_embeddings": False}


def mid_size(work: Path, s: dict[str, Any], n_full: int, lora_merge: bool) -> dict[str, Any]:
    """The default guard (rehearsal on auto) on a random ~1.1B Llama with `n_full` full fine-tunes
    and 8 LoRAs, beside mergekit's merge of the full fine-tunes and, with `lora_merge`, of the
    LoRAs: seconds and peak RSS.

    mergekit merges a LoRA by writing a merged copy of the base per adapter (its
    `lora_merge_cache`); to fit this machine's disk the copies are bfloat16
    (`lora_merge_dtype`, which halves what mergekit writes) and the full fine-tunes are deleted
    before they are written."""
    small = Path(s["base"])
    conf = work / "mid" / "config"
    conf.mkdir(parents=True, exist_ok=True)
    for f in small.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, conf / f.name)
    config = {**json.loads((small / "config.json").read_text()), **MID}
    (conf / "config.json").write_text(json.dumps(config))
    print("(m) a random ~1.1B Llama, its fine-tunes and LoRAs", flush=True)
    base = random_base(conf, work / "mid" / "base")
    full = [str(full_finetune(base, work / "mid" / f"f{i}", seed=i)) for i in range(n_full)]
    loras = [f"{base}+{random_lora(base, work / 'mid' / f'l{i}', seed=200 + i, like=None)}"
             for i in range(8)]
    zoo, tasks = Path(s["zoo"]), s["tasks"]
    size_mb = (base / "model.safetensors").stat().st_size / 2**20
    baseline = run("baseline", {}, work)
    res: dict[str, Any] = {"shape": MID, "model_size_mb": size_mb,
                           "baseline_rss_mb": baseline["peak_rss_mb"],
                           "baseline_anon_mb": baseline["peak_anon_mb"]}
    for kind, refs in (("full", full), ("lora", loras)):
        cfg = write_config(work / "mid" / f"{kind}.yml", base, refs, tasks[: len(refs)], zoo, k=5)
        cache = _fresh(work, f"m-{kind}")
        chk = run("check", {"config": str(cfg), "cache": str(cache)}, work,
                  {"MERGEKIT_COLLAPSE_CACHE": str(cache)})
        res[kind] = {"models": len(refs), "guard": chk,
                     **_above_baseline(chk, baseline, size_mb)}
        if kind == "full" or lora_merge:
            if kind == "lora":
                for f in full:
                    shutil.rmtree(f, ignore_errors=True)
            merge_out = work / "mid" / "merged"
            lora_cache = _fresh(work, "mid-lora-cache")
            dtype = "bfloat16" if kind == "lora" else None
            shutil.rmtree(merge_out, ignore_errors=True)
            mrg = run("merge", {"config": str(cfg), "out": str(merge_out),
                                "lora_cache": str(lora_cache), "lora_merge_dtype": dtype}, work)
            shutil.rmtree(merge_out, ignore_errors=True)
            shutil.rmtree(lora_cache, ignore_errors=True)
            res[kind] |= {"mergekit": mrg, "ratio": chk["seconds"] / mrg["seconds"],
                          **({"mergekit_lora_merge_dtype": dtype} if dtype else {})}
    return res


# ---------------------------------------------------------------- the benchmark


def _fresh(work: Path, name: str) -> Path:
    d = work / "cache" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def _linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    import numpy as np

    a, b = np.polyfit(x, y, 1)
    pred = np.polyval([a, b], x)
    r2 = 1 - float(((np.array(y) - pred) ** 2).sum() / ((np.array(y) - np.mean(y)) ** 2).sum())
    return {"slope_s_per_model": float(a), "intercept_s": float(b), "r2": r2}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    ns = [2, 4] if quick else [2, 4, 8, 16, 32, 64]
    n_full = 2 if quick else 4
    t_start = time.perf_counter()
    out: dict[str, Any] = {"env": {
        "load_at_start": _load(), "cpus": os.cpu_count(), "quick": quick,
        "omp_wait_policy": OMP_POLICY["value"] or "as in the environment",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, "targets": TARGETS}

    def save() -> None:  # after every section, so an interrupted run keeps what it measured
        out["env"]["load_at_end"] = _load()
        out["env"]["total_s"] = time.perf_counter() - t_start
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))

    out["env"]["device"] = DEVICE["value"]
    if args.base_config:  # no converted SmolLM2 here: a random one where the zoo looks for it
        from mergekit_collapse._constants import cache_root

        random_base(Path(args.base_config), cache_root() / "smollm2-135m-instruct")
        out["env"]["base"] = f"random-initialised from {Path(args.base_config).name}"
    sections = set(args.sections.split(","))
    print(f"load {out['env']['load_at_start']}; setting up in {work}", flush=True)
    s = setup(work, max(ns), n_full)
    base = Path(s["base"])
    zoo = Path(s["zoo"])
    out["setup"] = {k: v for k, v in s.items() if k != "scaling"}
    n_a = 2 if quick else 8
    refs = [f"{base}+{a}" for a in s["adapters"][:n_a]]
    cfg_lora = write_config(work / "lora.yml", base, refs, s["tasks"][:n_a], zoo, k=5)
    texts = _probe_texts(str(cfg_lora))
    size_mb = s["size_bytes"] / 2**20

    def extract_cold(name: str, models: list[str], probes: list[str], **kw: Any) -> dict[str, Any]:
        cache = _fresh(work, name)  # fresh cache root: vectors and file hashes cold
        env = kw.pop("env", {})
        spec = {"refs": models, "texts": probes, "cache": str(cache), **kw}
        return run("extract", spec, work, {"MERGEKIT_COLLAPSE_CACHE": str(cache), **env})

    # (a) extraction: guard cold / warm vs naive
    if "a" in sections:
        print(f"(a) {len(refs)} adapters x {len(texts)} probes", flush=True)
        # same dtype as the naive loop (float32, what from_pretrained gives this config), then the
        # guard's own default (dtype auto = bfloat16)
        cold = extract_cold("a", refs, texts, settings={"dtype": "float32"},
                            save=str(work / "guard_a.npy"))
        cold_default = extract_cold("a-default", refs, texts,
                                    save=str(work / "guard_a_default.npy"))
        warm = run("extract", {"refs": refs, "texts": texts, "cache": str(work / "cache" / "a"),
                               "settings": {"dtype": "float32"}}, work,
                   {"MERGEKIT_COLLAPSE_CACHE": str(work / "cache" / "a")})
        naive = run("naive", {"refs": refs, "texts": texts, "save": str(work / "naive_a.npy")},
                    work)
        g, nv = np.load(work / "guard_a.npy"), np.load(work / "naive_a.npy")
        out["a"] = {"models": len(refs), "probes": len(texts), "guard_cold": cold,
                    "guard_warm": warm, "guard_cold_default": cold_default, "naive": naive,
                    "speedup_cold": naive["seconds"] / cold["seconds"],
                    "speedup_default": naive["seconds"] / cold_default["seconds"],
                    "speedup_cold_wall": naive["wall_s"] / cold["wall_s"],
                    "speedup_warm": naive["seconds"] / warm["seconds"],
                    "max_abs_diff": float(np.abs(g - nv).max()),
                    "max_rel_diff": float(np.abs(g - nv).max() / np.abs(nv).max())}
        save()

    # (b) whole guard vs mergekit merge: adapters, then full fine-tunes
    if "b" in sections:
        print("(b) guard check vs mergekit run_merge", flush=True)
        baseline = run("baseline", {}, work)
        out["b"] = {"baseline_rss_mb": baseline["peak_rss_mb"],
                    "baseline_anon_mb": baseline["peak_anon_mb"], "model_size_mb": size_mb}
        full_refs = s["full"]
        cfg_full = write_config(work / "full.yml", base, full_refs, s["tasks"][:n_full], zoo, k=5)
        for kind, cfg in (("lora", cfg_lora), ("full", cfg_full)):
            cache_b = _fresh(work, f"b-{kind}")
            chk = run("check", {"config": str(cfg), "cache": str(cache_b)}, work,
                      {"MERGEKIT_COLLAPSE_CACHE": str(cache_b)})
            cache_g = _fresh(work, f"b-{kind}-geometry")
            geo = run("check", {"config": str(cfg), "cache": str(cache_g), "rehearse": "off"}, work,
                      {"MERGEKIT_COLLAPSE_CACHE": str(cache_g)})
            merge_out = Path("/dev/shm") / f"mkc-speed-merge-{kind}"
            lora_cache = _fresh(work, f"lora-merge-{kind}")
            shutil.rmtree(merge_out, ignore_errors=True)
            mrg = run("merge", {"config": str(cfg), "out": str(merge_out),
                                "lora_cache": str(lora_cache)}, work)
            shutil.rmtree(merge_out, ignore_errors=True)
            shutil.rmtree(lora_cache, ignore_errors=True)
            out["b"][kind] = {"models": n_a if kind == "lora" else n_full, "guard": chk,
                              "guard_geometry_only": geo, "mergekit": mrg,
                              "ratio": chk["seconds"] / mrg["seconds"],
                              "ratio_geometry_only": geo["seconds"] / mrg["seconds"],
                              "ratio_wall": chk["wall_s"] / mrg["wall_s"],
                              **_above_baseline(chk, baseline, size_mb)}
        save()

    if "m" in sections:
        out["m"] = mid_size(work, s, n_full, args.mid_lora_merge)
        save()

    # (d) scaling in N at a fixed probe set (N=2 also gives (c) at N=2)
    if "d" in sections:
        fixed = texts[:8]
        print(f"(d) scaling N={ns} x {len(fixed)} probes", flush=True)
        rows = []
        for n in ns:
            r = extract_cold(f"d{n}", [f"{base}+{a}" for a in s["scaling"][:n]], fixed)
            rows.append({"n": n, "seconds": r["seconds"], "s_per_model": r["seconds"] / n,
                         "peak_rss_mb": r["peak_rss_mb"], "load_before": r["load_before"]})
        tokens = _token_count(base, fixed)
        out["d"] = {"probes": len(fixed), "probe_tokens": tokens, "rows": rows,
                    "fit": _linear_fit([r["n"] for r in rows], [r["seconds"] for r in rows])}
        out["d"]["fit"]["s_per_model_ktoken"] = (out["d"]["fit"]["slope_s_per_model"]
                                                 / (tokens / 1000))
        out["d"]["a_s_per_model_ktoken"] = (cold["seconds"] / n_a
                                            / (_token_count(base, texts) / 1000))
        save()

    # (c) peak RSS vs one model's size: N=2 (scaling run), N=8 ((a) cold), full fine-tunes ((b))
    if {"b", "c", "d"} <= sections:
        print("(c) peak RSS", flush=True)
        baseline = run("baseline", {}, work)
        out["c"] = {"model_size_mb": size_mb, "baseline_rss_mb": baseline["peak_rss_mb"],
                    "runs": {}}
        for label, peak in ((f"lora N={ns[0]}", rows[0]["peak_rss_mb"]),
                            (f"lora N={n_a}", cold["peak_rss_mb"]),
                            (f"full N={n_full} (check)", out["b"]["full"]["guard"]["peak_rss_mb"]),
                            (f"lora N={max(ns)}", rows[-1]["peak_rss_mb"])):
            out["c"]["runs"][label] = {"peak_rss_mb": peak, "ratio": peak / size_mb,
                                       "ratio_above_baseline":
                                           (peak - baseline["peak_rss_mb"]) / size_mb}
        save()

    # (e) conflict metrics: streamed vs naive
    if "e" in sections:
        print("(e) conflicts", flush=True)
        out["e"] = {}
        n_e = 2 if quick else 3
        for kind, models in (("lora", refs[:n_e]), ("full", full_refs[:2])):
            res = {}
            for how in ("streamed", "naive"):
                res[how] = run("conflicts", {"how": how, "models": models, "base": str(base),
                                             "save": str(work / f"conf-{kind}-{how}.json")}, work)
            a_ = json.loads((work / f"conf-{kind}-streamed.json").read_text())
            b_ = json.loads((work / f"conf-{kind}-naive.json").read_text())
            diff = max(abs((x or 0.0) - (y or 0.0))
                       for m in a_ for ra, rb in zip(a_[m], b_[m], strict=True)
                       for x, y in zip(ra, rb, strict=True))
            out["e"][kind] = {"models": len(models), **res, "speedup": res["naive"]["seconds"]
                              / res["streamed"]["seconds"],
                              "rss_ratio": (res["naive"]["peak_rss_mb"]
                                            / res["streamed"]["peak_rss_mb"]),
                              "max_abs_diff": diff}
        save()

    # (f) FLOP/s vs matmul, fp32 and bf16; bf16 distance error (same 8 adapters as (a))
    if "f" in sections:
        print("(f) FLOP/s and dtype", flush=True)
        out["f"] = {}
        knobs = None if quick else {"batch": [1, 4, 40], "threads": [1]}
        for dt in ("float32", "bfloat16"):
            out["f"][dt] = run("flops", {"dtype": dt, "base": str(base), "lora": s["adapters"][0],
                                         "texts": texts, "reps": 1 if quick else 2,
                                         "knobs": knobs if dt == "float32" else None,
                                         "matmul_s": 1.0 if quick else 2.0}, work)
        # (a)'s two runs
        out["f"]["dtype_error"] = dtype_error(g, np.load(work / "guard_a_default.npy"))
        out["f"]["dtype_error"]["extract_s"] = {"float32": cold["seconds"],
                                                "bfloat16": cold_default["seconds"]}
        save()

    # (g) the fix: OpenMP spin-waiting (libgomp's default ACTIVE policy) vs PASSIVE, same extraction
    if "g" in sections:
        print("(g) OpenMP wait policy", flush=True)
        n_g = 2
        out["g"] = {"models": n_g, "probes": len(texts)}
        for label, env in (("as_is", {"OMP_WAIT_POLICY": "<unset>"}),
                           ("passive", {"OMP_WAIT_POLICY": "PASSIVE"}),
                           ("one_thread", {"OMP_WAIT_POLICY": "<unset>", "OMP_NUM_THREADS": "1"})):
            out["g"][label] = extract_cold(f"g-{label}", refs[:n_g], texts, env=env)
        out["g"]["speedup_passive"] = out["g"]["as_is"]["seconds"] / out["g"]["passive"]["seconds"]
        save()

    # (h) one vs two processes through accelerate (`check --num-processes`): same report, overhead
    if "h" in sections:
        print("(h) 1 vs 2 processes", flush=True)
        out["h"] = {"models": n_a, "probes": len(texts)}
        for n in (1, 2):
            cache_h, dest = _fresh(work, f"h{n}"), _fresh(work, f"h{n}-out")
            cmd = [sys.executable, "-m", "mergekit_collapse", "check", str(cfg_lora),
                   "--rehearse", "off", "--cache-dir", str(cache_h), "--out", str(dest),
                   "--format", "json", "--device", DEVICE["value"], "--num-processes", str(n)]
            load0, t0 = _load(), time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "MERGEKIT_COLLAPSE_CACHE": str(cache_h)})
            reports = sorted(dest.rglob("report.json"))
            out["h"][f"p{n}"] = {"wall_s": time.perf_counter() - t0, "load_before": load0,
                                 "exit": p.returncode, "stderr_tail": p.stderr[-500:],
                                 "report": reports[0].read_text() if reports else None}
        one, two = out["h"]["p1"].pop("report"), out["h"]["p2"].pop("report")
        out["h"]["identical_report"] = one is not None and one == two
        out["h"]["overhead"] = out["h"]["p2"]["wall_s"] / out["h"]["p1"]["wall_s"]
        save()
    return out


def _token_count(base: Path, texts: list[str]) -> int:
    from mergekit_collapse.guard.forward import encode_probes
    from mergekit_collapse.models.loading import load_tokenizer

    st = _settings()
    return sum(len(x) for x in encode_probes(load_tokenizer(base, st), texts, st))


def dtype_error(fp: Any, bf: Any) -> dict[str, float]:
    """Relative error bf16 introduces in drms (off-diagonal pairs) and r*^2, fp32 as reference."""
    import numpy as np

    from mergekit_collapse.guard import geometry

    d32, d16 = geometry.pairwise_distances(fp), geometry.pairwise_distances(bf)
    off = ~np.eye(len(fp), dtype=bool)
    rel = np.abs(d16.rms - d32.rms)[off] / d32.rms[off]
    r32 = geometry.enclosing_ball(d32.sq).radius_sq
    r16 = geometry.enclosing_ball(d16.sq).radius_sq
    return {"drms_rel_err_max_models": float(rel.max()),
            "drms_rel_err_median_models": float(np.median(rel)),
            "rstar2_rel_err_models": float(abs(r16 - r32) / r32), "rstar2_fp32": float(r32),
            "vector_rel_err": float(np.linalg.norm(bf - fp) / np.linalg.norm(fp))}


# ---------------------------------------------------------------- report


def _ok(value: float, target: float, higher: bool) -> str:
    return "met" if (value >= target if higher else value <= target) else "MISSED"


def table(r: dict[str, Any]) -> str:
    """The side-by-side table printed at the end of a run."""
    from tabulate import tabulate

    rows: list[list[str]] = []

    def row(name: str, value: str, status: str = "") -> None:
        rows.append([name, value, status])

    if "a" in r:
        a = r["a"]
        row(f"(a) naive loop, {a['models']} adapters x {a['probes']} probes",
            f"{a['naive']['seconds']:.1f} s")
        row("(a) guard extraction, cold cache, float32", f"{a['guard_cold']['seconds']:.1f} s")
        row("(a) guard extraction, warm cache", f"{a['guard_warm']['seconds']:.2f} s")
        row("(a) speedup cold, both float32", f"{a['speedup_cold']:.2f}x")
        row("(a) guard extraction, cold, default (dtype auto)",
            f"{a['guard_cold_default']['seconds']:.1f} s")
        t = TARGETS["a_speedup"]
        row("(a) speedup cold, defaults (naive / guard)", f"{a['speedup_default']:.2f}x",
            f">= {t:g}x  {_ok(a['speedup_default'], t, True)}")
        x = a["guard_cold_default"]
        if x.get("tokens_saved") is not None:
            row("(a) probe tokens computed / saved by the shared prefix",
                f"{x['tokens_computed']} / {x['tokens_saved']}")
        row("(a) speedup warm", f"{a['speedup_warm']:.0f}x")
        row("(a) max |guard - naive| (relative)",
            f"{a['max_abs_diff']:.1e} ({a['max_rel_diff']:.1e})")
    for kind, tgt in (("lora", TARGETS["b_ratio_lora"]), ("full", TARGETS["b_ratio_full"])):
        if kind in r.get("b", {}):
            x = r["b"][kind]
            row(f"(b) {kind} x{x['models']}: guard check (default, with rehearsal) / mergekit",
                f"{x['guard']['seconds']:.1f} / {x['mergekit']['seconds']:.1f} s")
            row(f"(b) {kind} ratio, default", f"{x['ratio']:.2f}x",
                f"<= {tgt:g}x  {_ok(x['ratio'], tgt, False)}")
            t = TARGETS["c_rss_ratio"]
            for what, key in MEMORY_ROWS:
                if key in x:
                    row(f"(b) {kind} guard {what} above baseline / one model", f"{x[key]:.2f}x",
                        f"<= {t:g}x  {_ok(x[key], t, False)}")
            if "ratio_geometry_only" in x:
                row(f"(b) {kind} ratio, geometry only (--rehearse off)",
                    f"{x['guard_geometry_only']['seconds']:.1f} s = "
                    f"{x['ratio_geometry_only']:.2f}x",
                    f"<= {tgt:g}x  {_ok(x['ratio_geometry_only'], tgt, False)}")
    for kind, x in ((k, v) for k, v in r.get("m", {}).items()
                    if isinstance(v, dict) and "guard" in v):
        g = x["guard"]
        row(f"(m) ~1.1B, {kind} x{x['models']}: guard (rehearsal {g.get('rehearsal')})",
            f"{g['seconds']:.1f} s" + (f" / mergekit {x['mergekit']['seconds']:.1f} s = "
                                       f"{x['ratio']:.2f}x" if "mergekit" in x else ""))
        t = TARGETS["c_rss_ratio"]
        for what, key in MEMORY_ROWS:
            if key in x:
                row(f"(m) {kind} guard {what} above baseline / one model", f"{x[key]:.2f}x",
                    f"<= {t:g}x  {_ok(x[key], t, False)}")
    if "c" in r:
        c = r["c"]
        row("(c) model size (safetensors)", f"{c['model_size_mb']:.0f} MB")
        row("(c) Python+torch+transformers baseline RSS", f"{c['baseline_rss_mb']:.0f} MB")
        geo = r.get("b", {}).get("full", {}).get("guard_geometry_only")
        if geo:  # the rehearsal holds the merge's inputs at once; extraction alone frees each model
            c["runs"][f"full N={r['b']['full']['models']} (check --rehearse off)"] = {
                "peak_rss_mb": geo["peak_rss_mb"], "ratio": geo["peak_rss_mb"] / c["model_size_mb"],
                "ratio_above_baseline":
                    (geo["peak_rss_mb"] - c["baseline_rss_mb"]) / c["model_size_mb"]}
        for n, x in c["runs"].items():
            t = TARGETS["c_rss_ratio"]
            row(f"(c) guard peak RSS, {n}", f"{x['peak_rss_mb']:.0f} MB = {x['ratio']:.2f}x",
                f"above baseline {x['ratio_above_baseline']:.2f}x: <= {t:g}x "
                f"{_ok(x['ratio_above_baseline'], t, False)}")
    if "d" in r:
        d = r["d"]
        for x in d["rows"]:
            row(f"(d) N={x['n']} ({d['probes']} probes, {d['probe_tokens']} tok)",
                f"{x['seconds']:.1f} s = {x['s_per_model']:.2f} s/model")
        row("(d) linear fit seconds = a + b N", f"b = {d['fit']['slope_s_per_model']:.2f} s/model",
            f"a = {d['fit']['intercept_s']:.1f} s, R^2 = {d['fit']['r2']:.4f}")
        row("(d) s per model per 1k probe tokens", f"{d['fit']['s_per_model_ktoken']:.2f}",
            f"(a) at {r['a']['probes']} probes: {d['a_s_per_model_ktoken']:.2f}")
    for kind, x in r.get("e", {}).items():
        row(f"(e) conflicts {kind} x{x['models']}: streamed / naive",
            f"{x['streamed']['seconds']:.1f} / {x['naive']['seconds']:.1f} s",
            f"speedup {x['speedup']:.1f}x, max diff {x['max_abs_diff']:.0e}")
        row(f"(e) conflicts {kind}: peak RSS streamed / naive",
            f"{x['streamed']['peak_rss_mb']:.0f} / {x['naive']['peak_rss_mb']:.0f} MB")
    for dt in ("float32", "bfloat16"):
        if dt in r.get("f", {}):
            x = r["f"][dt]
            row(f"(f) {dt}: extraction GFLOP/s base / LoRA",
                f"{x['extraction_flops_base'] / 1e9:.1f} / {x['extraction_flops_lora'] / 1e9:.1f}")
            row(f"(f) {dt}: dense matmul GFLOP/s", f"{x['matmul_flops'] / 1e9:.1f}")
            t = TARGETS["f_fraction"]
            row(f"(f) {dt}: fraction base / LoRA",
                f"{x['fraction_base']:.0%} / {x['fraction_lora']:.0%}",
                f">= {t:.0%}  {_ok(min(x['fraction_base'], x['fraction_lora']), t, True)}")
    if "dtype_error" in r.get("f", {}):
        de = r["f"]["dtype_error"]
        row("(f) bf16 vs fp32: drms rel err max / median",
            f"{de['drms_rel_err_max_models']:.1e} / {de['drms_rel_err_median_models']:.1e}")
        row("(f) bf16 vs fp32: r*^2 rel err", f"{de['rstar2_rel_err_models']:.1e}")
        row("(f) guard extraction (a) fp32 / bf16", f"{de['extract_s']['float32']:.1f} / "
            f"{de['extract_s']['bfloat16']:.1f} s")
    if "g" in r:
        g = r["g"]
        row(f"(g) extraction {g['models']}x{g['probes']}: OMP as-is",
            f"{g['as_is']['seconds']:.1f} s")
        row("(g) OMP_WAIT_POLICY=PASSIVE / 1 thread",
            f"{g['passive']['seconds']:.1f} / {g['one_thread']['seconds']:.1f} s",
            f"speedup {g['speedup_passive']:.1f}x")
    if "h" in r:
        h = r["h"]
        row(f"(h) check {h['models']} adapters: 1 / 2 processes (accelerate)",
            f"{h['p1']['wall_s']:.1f} / {h['p2']['wall_s']:.1f} s",
            f"2-process overhead {h['overhead']:.2f}x; identical report: {h['identical_report']}")
    return (tabulate(rows, headers=["item", "value", "target / status"],
                     colalign=("left", "right", "left"), disable_numparse=True)
            + f"\ndevice {r['env'].get('device', 'cpu')}; "
            f"load average: start {r['env']['load_at_start']}, end {r['env'].get('load_at_end')}; "
            f"OMP_WAIT_POLICY {r['env']['omp_wait_policy']}; "
            f"total {r['env'].get('total_s', 0):.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="2-minute smoke run (small N)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "speed.json"))
    p.add_argument("--work", default="/tmp/mkc-speed", help="scratch folder (models, caches)")
    p.add_argument("--omp-wait-policy", default="",
                   help="OMP_WAIT_POLICY for the workers ('' = as in the environment); "
                        "(g) compares")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU table")
    p.add_argument("--base-config", default=None,
                   help="a folder with a config.json and tokenizer: use a random-initialised "
                        "base of it (for a machine without the converted SmolLM2)")
    p.add_argument("--sections", default="a,b,c,d,e,f,g,h",
                   help="which sections to run (c needs a, b and d; m: the ~1.1B mid-size case)")
    p.add_argument("--mid-lora-merge", action="store_true",
                   help="(m): also time mergekit's merge of the 8 LoRAs (writes 8 bfloat16 copies "
                        "of the 1.1B base, 18 GB, and deletes the full fine-tunes first)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    OMP_POLICY["value"] = args.omp_wait_policy
    DEVICE["value"] = args.device
    if args.worker:
        worker_main(*args.worker)
        return 0
    res = bench(args)
    print(table(res))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
