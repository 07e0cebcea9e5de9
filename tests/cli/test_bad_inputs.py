"""The bad-input corpus (README "Bad input: what you get"): every case exits with its documented
code (errors.py: 1 unexpected, 2 bad input, 3 guard stopped, 4 Hub) and says on ONE line what is
wrong, where, and what to do. Real tiny models throughout; the cheap cases never load one."""

from __future__ import annotations

import json
import logging
import os
import pkgutil
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from common import make_lora, make_tiny_llama, make_tiny_tasks
from hub_server import TOKEN, FakeHub
from reports import make_merged_dir

from mergekit_collapse.cli import main
from mergekit_collapse.runtime import Runtime

PROBES = ["alpha beta", "gamma delta epsilon", "zeta eta", "one two three", "four five", "x y z"]
#: what every `check` run of the corpus adds: cheap, quiet, deterministic
FAST = ("--no-progress", "--rehearse", "off", "--device", "cpu", "--dtype", "float32")


@dataclass
class Env:
    """One case's world: a temporary folder, the session zoo and the odd models."""

    tmp: Path
    zoo: dict[str, Path]
    odd: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch
    hub: FakeHub | None = None

    def ref(self, name: str) -> str:
        """A model reference: a zoo or odd model by name, `base+loraX`, else the name itself."""
        if name.startswith("lora"):
            return f"{self.zoo['base']}+{self.zoo.get(name) or self.odd[name]}"
        found = self.zoo.get(name) or self.odd.get(name)
        return str(found) if found else name

    def raw(self, models: tuple[str, ...] = ("ft1", "ft2"), *, method: str = "task_arithmetic",
            base: str | None = "base", weight: Any = 0.5, **guard: Any) -> dict:
        """A guarded mergekit config as a dict: each model a task with two probes."""
        refs = [self.ref(m) for m in models]
        cfg: dict[str, Any] = {"merge_method": method}
        if base:
            cfg["base_model"] = self.ref(base)
        cfg["models"] = [{"model": r} | ({"parameters": {"weight": weight}}
                                         if weight is not None else {})
                         for r in refs]
        cfg["dtype"] = "float32"
        tasks = {r: {"name": m, "probes": PROBES[2 * i: 2 * i + 2]}
                 for i, (r, m) in enumerate(zip(refs, models, strict=True))}
        cfg["guard"] = {"tasks": tasks, "k": 2, **guard}
        return cfg

    def write(self, content: dict | str | bytes, name: str = "config.yml") -> Path:
        path = self.tmp / name
        if isinstance(content, dict):
            content = yaml.safe_dump(content, sort_keys=False)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def config(self, *models: str, **kw: Any) -> str:
        return str(self.write(self.raw(models or ("ft1", "ft2"), **kw)))

    def with_task(self, probes: Any, **kw: Any) -> str:
        """A config whose first task has these `probes`."""
        raw = self.raw(**kw)
        next(iter(raw["guard"]["tasks"].values()))["probes"] = probes
        return str(self.write(raw))


@dataclass(frozen=True)
class Case:
    """A bad input: the command line it makes, the exit code and the words of its one line."""

    id: str
    args: Callable[[Env], list[str]]
    code: int
    words: tuple[str, ...]
    entry: str = "cli"  # cli: mergekit-collapse | yaml: mergekit-yaml --guard
    hub: bool = False  # runs against the in-memory Hub (tests/hub_server.py)


def _fill_cache(env: Env) -> str:
    """Run the guard once so the cache holds every model's vectors; the config."""
    from mergekit_collapse import check as api_check

    cfg = env.config()
    api_check(cfg, runtime=Runtime(device="cpu", dtype="float32", progress=False), rehearse="off")
    return cfg


def _corrupt_npz(env: Env, data: Callable[[bytes], bytes]) -> list[str]:
    cfg = _fill_cache(env)
    first = sorted((env.tmp / "cache" / "hidden_states").rglob("*.npz"))[0]
    first.write_bytes(data(first.read_bytes()))
    return ["check", cfg, *FAST, "--absolute-budget", "1e9"]


def _null_hashes(env: Env) -> list[str]:
    cfg = _fill_cache(env)
    (env.tmp / "cache" / "file_hashes.json").write_text("null")
    return ["check", cfg, *FAST, "--absolute-budget", "1e9"]


def _probe_file(env: Env, name: str, data: bytes | None, **spec: Any) -> list[str]:
    if data is not None:
        (env.tmp / name).write_bytes(data)
    return ["check", env.with_task({"file": name, **spec}), *FAST]


def _merge(env: Env, out: str, *extra: str, entry: str = "merge") -> list[str]:
    head = ["merge"] if entry == "merge" else []
    return [*head, env.config(), out, "--guard-rehearse", "off", "--guard-cache-dir",
            str(env.tmp / "cache"), *extra]


def _extra_task(env: Env) -> str:
    raw = env.raw()
    raw["guard"]["tasks"]["/no/such"] = {"name": "z", "probes": ["q"]}
    return str(env.write(raw))


def _budget_flag(value: str) -> Callable[[Env], list[str]]:
    return lambda e: ["check", e.config(), *FAST, "--budget", value]


def _budget_yaml(value: float) -> Callable[[Env], list[str]]:
    return lambda e: ["check", e.config(budget={"relative": value})]


def _interrupt(env: Env, target: str, after: int) -> None:
    """Ctrl-C from inside `target` (module.attr), after `after` calls went through."""
    original, calls = pkgutil.resolve_name(target), []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    env.monkeypatch.setattr(target, interrupted)


def _ctrl_c_extracting(env: Env) -> list[str]:
    _interrupt(env, "mergekit_collapse.guard.extract.run_forward", 1)
    return ["check", env.config(), *FAST]


def _ctrl_c_merging(env: Env, entry: str = "merge") -> list[str]:
    _interrupt(env, "mergekit.io.tensor_writer.TensorWriter.save_tensor", 3)
    return _merge(env, str(env.tmp / "out"), "--guard-absolute-budget", "1e9", "--quiet",
                  entry=entry)


def _push(env: Env, repo: str = "alice/merged", *extra: str, token: str | None = None,
          endpoint: str | None = None) -> list[str]:
    """`push` of a finished merge folder (card included) to the in-memory Hub."""
    from mergekit_collapse.publish.card import write_card

    out = make_merged_dir(env.tmp)
    write_card(out)
    if token:
        env.monkeypatch.setenv("HF_TOKEN", token)
    if endpoint:
        env.monkeypatch.setenv("HF_ENDPOINT", endpoint)
    return ["push", str(out), repo, *extra]


def _card(env: Env, template: str) -> list[str]:
    """`card` of a finished merge folder with this template of the user's."""
    return ["card", str(make_merged_dir(env.tmp)), "--template", str(env.write(template, "t.md"))]


def _evaluate_plain(env: Env, **guard: Any) -> list[str]:
    """`evaluate` (on a tiny lm-eval task) of a merge of ft1 and a model whose tokenizer has no chat
    template (ft1's folder stands for the merge)."""
    tasks = make_tiny_tasks(env.tmp)
    raw = env.raw(("ft1", "plain_ft"), **guard)
    for spec in raw["guard"]["tasks"].values():
        spec["eval"] = str(tasks / "tiny_mc.yaml")
    return ["evaluate", str(env.zoo["ft1"]), str(env.write(raw)), "--limit", "2",
            "--batch-size", "2"]


def _dead_endpoint() -> str:
    """A local address nobody listens on: the connection is refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _hub_model(env: Env, *, fault: int | None = None, dead: bool = False) -> list[str]:
    """`check` of a config with a Hub model id: the Hub fails (`fault` on its model API) or is
    down."""
    from huggingface_hub import constants

    assert env.hub is not None
    env.hub.create("alice/model")
    if fault:
        env.hub.faults["model_info"] = fault
    if dead:
        env.monkeypatch.setattr(constants, "ENDPOINT", _dead_endpoint())
    return ["check", env.config("ft1", "alice/model"), *FAST]


def _old_merge(env: Env) -> Path:
    """An earlier merge's folder (config and weights): the guard that stops must leave it as it
    was."""
    return Path(shutil.copytree(env.zoo["base"], env.tmp / "old_merge"))


def _a_file(env: Env) -> Path:
    path = env.tmp / "a_file"
    path.write_text("not a folder")
    return path


LONG = "n" * 300  # one path component over the 255 bytes file systems allow


def _long_name(env: Env, where: str) -> list[str]:
    """A path with a component over 255 characters, in each place a path is given."""
    long = str(env.tmp / LONG)
    if where == "config":
        return ["check", long + ".yml", *FAST]
    if where == "model":
        return ["check", env.config("ft1", long), *FAST]
    if where == "probe":
        return _probe_file(env, LONG + ".txt", None)
    return ["check", env.config(), *FAST, "--out", long]


def _cache_at(env: Env, where: str) -> list[str]:
    """`check` with MERGEKIT_COLLAPSE_CACHE somewhere nothing can be written."""
    if where == "file":
        cache = _a_file(env)
    elif where == "under-a-file":
        cache = _a_file(env) / "cache"
    else:  # a read-only file system: sysfs in a container, else skipped
        cache = Path("/sys/mergekit-collapse-cache")
        try:
            cache.mkdir()
            cache.rmdir()
            pytest.skip("/sys is writable here: no read-only file system to try")
        except OSError:
            pass
    env.monkeypatch.setenv("MERGEKIT_COLLAPSE_CACHE", str(cache))
    return ["check", env.config(), *FAST, "--absolute-budget", "1e9"]


def _calibrate_out(env: Env, out: str) -> list[str]:
    records = env.write("group,task,method,model,loss,mds\n1,a,linear,m1,-50,0.9\n"
                        "1,b,linear,m2,-1,0.2\n2,a,ties,m1,-5,0.1\n2,b,ties,m2,-40,0.8\n",
                        "records.csv")
    target = (str(_a_file(env) / "cal.json") if out == "under-a-file"
              else "/sys/mergekit-collapse.json")
    return ["calibrate", str(records), "--out", target]


def _github_file_unwritable(env: Env, var: str) -> list[str]:
    env.monkeypatch.setenv(var, str(_a_file(env) / "x"))
    return ["check", env.config(), *FAST, "--absolute-budget", "1e9", "--format", "github"]


def _card_with(env: Env, name: str, data: bytes | None, *, folder: bool = False) -> list[str]:
    """`card` of a finished merge folder where `name` (relative to it) holds `data` (or is a
    folder)."""
    out = make_merged_dir(env.tmp)
    target = out / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        target.mkdir()
    elif data is not None:
        target.write_bytes(data)
    return ["card", str(out)]


def _card_long_task(env: Env) -> list[str]:
    """`card` where an lm-eval task name is 300 characters (the .eval_results file it names)."""
    from reports import EVALUATION

    out = make_merged_dir(env.tmp)
    evaluation = json.loads(json.dumps(EVALUATION))
    for t in evaluation["tasks"]:
        t["eval"] = "t" * 300
    (out / "mergeability" / "evaluation.json").write_text(json.dumps(evaluation))
    return ["card", str(out)]


def _push_token_name(env: Env, *extra: str) -> list[str]:
    args = _push(env, "alice/merged", *extra, token=TOKEN)
    (env.tmp / "merged" / f"notes-{TOKEN}.txt").write_text("harmless")
    return args


def _push_fifo(env: Env) -> list[str]:
    args = _push(env, "alice/merged", "--dry-run")
    os.mkfifo(env.tmp / "merged" / "pipe")
    return args


def _jsonl_probe(env: Env, value: Any) -> list[str]:
    return _probe_file(env, "p.jsonl", (json.dumps({"text": value}) + "\n").encode())


DUP_GUARD = """merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 1}}}}
  - {{model: {b}, parameters: {{weight: 1}}}}
guard:
  tasks: {{{a}: {{name: a, probes: [x]}}, {b}: {{name: b, probes: [y]}}}}
guard:
  k: 3
"""

CASES = [
    # ---- the config file
    Case("yaml-malformed", lambda e: ["check", str(e.write("merge_method: linear\nmodels:\n"
                                                           "  - model: a\n"
                                                           "    parameters: {weight: 1\n"))],
         2, ("malformed YAML", "line 5")),
    Case("yaml-duplicate-guard", lambda e: ["check", str(e.write(DUP_GUARD.format(
        a=e.ref("ft1"), b=e.ref("ft2"))))], 2,
         ("duplicate key 'guard'", "line 7", "first at line 5")),
    # guard: is last, k: its last key
    Case("yaml-duplicate-nested", lambda e: ["check", str(e.write(
        yaml.safe_dump(e.raw(), sort_keys=False) + "  k: 3\n"))], 2, ("duplicate key 'k'", "line")),
    Case("yaml-not-a-mapping", lambda e: ["check", str(e.write("- a\n- b\n"))], 2,
         ("must be a YAML mapping",)),
    Case("config-missing", lambda e: ["check", str(e.tmp / "nope.yml")], 2,
         ("config file not found",)),
    Case("config-not-utf8",
         lambda e: ["check", str(e.write(b"merge_method: linear\n# \xff\xfe\n"))], 2,
         ("not UTF-8", "byte 23")),
    Case("guard-unknown-key", lambda e: ["check", e.config(budjet={"relative": 1})], 2,
         ("unknown key 'guard.budjet'", "did you mean 'budget'")),
    Case("guard-unknown-task-key", lambda e: ["check", _extra_task(e)], 2,
         ("guard.tasks names '/no/such'", "not a model of this merge")),
    Case("guard-no-tasks", lambda e: ["check", str(e.write({**e.raw(), "guard": {"k": 2}}))], 2,
         ("no guard.tasks",)),
    Case("guard-unknown-action", lambda e: ["check", e.config(action="abrot")], 2,
         ("unknown action 'abrot'", "did you mean 'abort'")),
    Case("guard-k-zero-yaml", lambda e: ["check", e.config(k=0)], 2,
         ("guard.k", "greater than or equal to 1")),
    # ---- mergekit's own rules, before any model is loaded (the models here do not even exist)
    Case("mergekit-unknown-method", lambda e: ["check", e.config("org/a", "org/b", method="lineer",
                                                                  base=None)], 2,
         ("unknown merge_method 'lineer'", "did you mean 'linear'")),
    Case("mergekit-linear-base-no-weight",
         lambda e: ["check", e.config("org/a", "org/b", method="linear", base="org/base")], 2,
         ("Missing required parameter weight for org/base", "parameters:")),
    Case("mergekit-missing-parameter",
         lambda e: ["check", e.config("org/a", "org/b", base="org/base", weight=None)], 2,
         ("Missing required parameter weight for org/a",)),
    Case("mergekit-bad-parameter", lambda e: ["check", e.config("org/a", "org/b", base="org/base",
                                                                 weight="heavy")], 2,
         ("'heavy' is not valid", "number")),
    Case("mergekit-same-model-twice",
         lambda e: ["check", e.config("org/a", "org/a", base="org/base")], 2,
         ("Duplicate merge inputs",)),
    Case("mergekit-schema", lambda e: ["check", str(e.write("merge_method: linear\nmodels:\n"
                                                           "  - parameters: {weight: 1}\n"))], 2,
         ("invalid mergekit config",)),
    # ---- the planner's pool and search space (`mergekit-collapse plan`), before any model loads
    Case("plan-unknown-method", lambda e: ["plan", e.config(plan={"methods": ["lineer"]})], 2,
         ("unknown merge method 'lineer'", "did you mean 'linear'")),
    Case("plan-one-model", lambda e: ["plan", e.config("ft1")], 2, ("a plan merges two or more",)),
    Case("plan-must-include-unknown",
         lambda e: ["plan", e.config(plan={"must_include": ["/no/such"]})], 2,
         ("guard.plan.must_include names '/no/such'", "not a model of the pool")),
    Case("plan-floor-out-of-range", lambda e: ["plan", e.config(), "--floor", "2"], 2,
         ("invalid plan option floor=2.0", "less than or equal to 1")),
    Case("plan-refine-over-budget",
         lambda e: ["plan", e.config(), "--refine", "5", "--max-rehearsals", "2"], 2,
         ("refine (5) exceeds the rehearsal budget (2)",)),
    # ---- models
    Case("model-path-missing",
         lambda e: ["check", e.config("ft1", str(e.tmp / "no-such-model")), *FAST], 2,
         ("no-such-model", "not a local folder")),
    Case("model-hub-offline",
         lambda e: ["check", e.config("ft1", "no-such-org/no-such-model"), *FAST], 2,
         ("no-such-org/no-such-model", "HF_HUB_OFFLINE")),
    Case("model-hub-missing", lambda e: ["check", e.config("ft1", "alice/no-such-model"), *FAST], 2,
         ("alice/no-such-model", "no such repository", "HTTP 401"), hub=True),
    Case("model-hub-5xx", lambda e: _hub_model(e, fault=503), 4,
         ("alice/model", "HTTP 503", "retry"), hub=True),
    Case("model-hub-refused", lambda e: _hub_model(e, dead=True), 4,
         ("alice/model", "cannot be reached", "HF_ENDPOINT"), hub=True),
    Case("model-is-a-file", lambda e: ["check", e.config("ft1", str(_a_file(e))), *FAST], 2,
         ("is a file, not a model folder",)),
    Case("models-hidden-size", lambda e: ["check", e.config("ft1", "wide"), *FAST], 2,
         ("hidden_size differs", "wide")),
    Case("models-vocab-size", lambda e: ["check", e.config("ft1", "bigvocab"), *FAST], 2,
         ("vocab_size differs", "tokenizer_source")),
    Case("models-architecture", lambda e: ["check", e.config("ft1", "qwen"), *FAST], 2,
         ("architecture differs", "LlamaForCausalLM", "Qwen2ForCausalLM")),
    Case("models-layer-count", lambda e: ["check", e.config("ft1", "deep"), *FAST], 2,
         ("num_hidden_layers differs", "slices")),
    Case("lora-without-base", lambda e: ["check", e.config("ft1", str(e.zoo["lora1"])), *FAST], 2,
         ("is a LoRA adapter, not a model", "base+", "adapter_config.json")),
    Case("lora-for-another-base", lambda e: ["check", e.config("lora1", "lora_wide"), *FAST], 2,
         ("LoRA adapter", "lora_wide", "another base")),
    Case("one-model-only", lambda e: ["check", e.config("ft1"), *FAST], 2,
         ("only one model", "two or more")),
    Case("nan-weights", lambda e: ["check", e.config("ft1", "nan"), *FAST], 2,
         ("NaN", "nan", "weights hold NaN", "q_proj")),
    Case("nan-weights-bfloat16", lambda e: ["check", e.config("ft1", "nan"), "--no-progress",
                                            "--rehearse", "off", "--dtype", "bfloat16"], 2,
         ("in bfloat16", "weights hold NaN", "q_proj", "check the checkpoint")),
    Case("hidden-states-fp16-overflow", lambda e: ["check", e.config("ft1", "overflow"),
                                                   "--no-progress", "--rehearse", "off",
                                                   "--dtype", "float16"], 2,
         ("overflow", "NaN or inf in float16", "--dtype float32")),
    Case("tokenizer-missing", lambda e: ["check", e.config("no_tokenizer", "ft1"), *FAST], 2,
         ("no_tokenizer has no tokenizer", "copy its base model's tokenizer files")),
    Case("safetensors-truncated", lambda e: ["check", e.config("ft1", "truncated"), *FAST], 2,
         ("cannot load model", "truncated or not safetensors")),
    Case("safetensors-garbage", lambda e: ["check", e.config("ft1", "garbage"), *FAST], 2,
         ("cannot load model", "truncated or not safetensors")),
    Case("pickle-only", lambda e: ["check", e.config("ft1", "pickle"), *FAST], 2,
         ("pickle", "--allow-pickle")),
    Case("pickle-allowed", lambda e: ["check", e.config("ft1", "pickle"), *FAST, "--allow-pickle",
                                      "--absolute-budget", "1e9"], 0, ()),
    Case("remote-code", lambda e: ["check", e.config("ft1", "remote"), *FAST], 2,
         ("custom code", "--trust-remote-code")),
    Case("layer-out-of-range", lambda e: ["check", e.config(), *FAST, "--layer", "99"], 2,
         ("layer 99", "out of range")),
    # ---- probes
    Case("probes-empty", lambda e: ["check", e.with_task([]), *FAST], 2, ("no non-empty probes",)),
    Case("probes-blank", lambda e: ["check", e.with_task(["", "  "]), *FAST], 2,
         ("no non-empty probes",)),
    Case("probes-null", lambda e: ["check", e.with_task(None), *FAST], 2, ("has no probes",)),
    Case("probe-field-null", lambda e: _probe_file(e, "p.jsonl", b'{"text": "a"}\n', field=None), 2,
         ("guard.tasks", "probes.field", "valid string")),
    Case("probe-file-missing", lambda e: _probe_file(e, "nope.txt", None), 2,
         ("cannot read probe file", "nope.txt")),
    Case("probe-file-not-utf8", lambda e: _probe_file(e, "p.txt", b"fine\n\xff\xfe bad\n"), 2,
         ("p.txt", "not UTF-8")),
    Case("probe-file-10mb-line", lambda e: _probe_file(e, "p.txt",
                                                       b"ok\n" + b"x" * 10_000_000 + b"\n"), 2,
         ("p.txt:2", "10.0 MB", "at most")),
    Case("probe-jsonl-bad-row", lambda e: _probe_file(e, "p.jsonl", b'{"text": "a"}\n{oops\n'), 2,
         ("p.jsonl:2", "not valid JSON")),
    Case("k-larger-than-docs",
         lambda e: ["check", e.config(k=50), *FAST, "--absolute-budget", "1e9"], 0,
         ("fewer than k=50",)),
    Case("k-zero-flag", lambda e: ["check", e.config(), *FAST, "--k", "0"], 2,
         ("k=0", "greater than or equal to 1")),
    # ---- budgets: flag, YAML, and the mergekit-yaml / merge hooks
    *[Case(f"budget-flag-{v}", _budget_flag(v), 2,
           ("budget", why)) for v, why in (("-1", "greater than 0"), ("0", "greater than 0"),
                                           ("nan", "finite"), ("inf", "finite"))],
    Case("budget-absolute-nan", lambda e: ["check", e.config(), *FAST, "--absolute-budget", "nan"],
         2, ("budget.absolute", "finite")),
    Case("budget-both", lambda e: ["check", e.config(), *FAST, "--budget", "1",
                                   "--absolute-budget", "1"],
         2, ("not both",)),
    *[Case(f"budget-yaml-{name}", _budget_yaml(v), 2,
           ("guard.budget.relative", why))
      for name, v, why in (("negative", -1, "greater than 0"), ("zero", 0, "greater than 0"),
                           ("nan", float("nan"), "finite"), ("inf", float("inf"), "finite"))],
    Case("budget-mergekit-yaml-hook",
         lambda e: _merge(e, str(e.tmp / "out"), "--guard-budget", "-1", entry="yaml"),
         2, ("budget", "greater than 0"), entry="yaml"),
    Case("budget-mergekit-yaml-hook-nan", lambda e: _merge(e, str(e.tmp / "out"), "--guard-budget",
                                                           "nan", entry="yaml"),
         2, ("budget", "finite"), entry="yaml"),
    Case("budget-merge-inf", lambda e: _merge(e, str(e.tmp / "out"), "--guard-budget", "inf"), 2,
         ("budget", "finite")),
    # ---- outputs
    Case("check-out-is-a-file", lambda e: ["check", e.config(), *FAST, "--out", str(_a_file(e))], 2,
         ("--out", "is a file")),
    Case("check-out-not-writable", lambda e: ["check", e.config(), *FAST, "--out",
                                              str(_a_file(e) / "out")], 2,
         ("--out", "a_file", "not a folder")),
    Case("merge-out-is-a-file", lambda e: _merge(e, str(_a_file(e))), 2, ("OUT", "is a file")),
    Case("merge-out-not-writable", lambda e: _merge(e, str(_a_file(e) / "out")), 2,
         ("a_file", "not a folder")),
    Case("merge-out-not-a-merge", lambda e: _merge(e, str(e.tmp)), 2,
         ("is not a merged model folder", "choose a new or empty folder")),
    Case("merge-out-exists",
         lambda e: _merge(e, str(_old_merge(e)), "--guard-absolute-budget", "1e-9", "--quiet"), 3,
         ("guard stopped the merge", "budget")),
    # ---- runtime flags
    Case("device-banana", lambda e: ["check", e.config(), "--no-progress", "--device", "banana"], 2,
         ("--device", "banana", "cpu")),
    Case("dtype-banana", lambda e: ["check", e.config(), *FAST, "--dtype", "banana"], 2,
         ("dtype", "banana", "float32")),
    Case("num-processes-zero", lambda e: ["check", e.config(), *FAST, "--num-processes", "0"], 2,
         ("--num-processes", "greater than or equal to 1")),
    Case("evaluate-limit-zero", lambda e: ["evaluate", str(e.tmp), e.config(), "--limit", "0"], 2,
         ("--limit", "0", "1")),
    # ---- the hidden-state cache: recomputed with a warning, never a failure
    Case("cache-npz-truncated", lambda e: _corrupt_npz(e, lambda b: b[: len(b) // 2]), 0,
         ("recomputing corrupt cache entry",)),
    Case("cache-npz-empty", lambda e: _corrupt_npz(e, lambda b: b""), 0,
         ("recomputing corrupt cache entry",)),
    Case("cache-file-hashes-null", _null_hashes, 0, ("file_hashes.json", "recomputing")),
    Case("evaluate-no-chat-template", _evaluate_plain, 0, ("has no chat template",
                                                         "guard.chat_template: false")),
    Case("evaluate-chat-template-false", lambda e: _evaluate_plain(e, chat_template=False), 0, ()),
    # ---- the analysis commands
    Case("conflicts-nan-weights", lambda e: ["conflicts", e.config("ft1", "nan")], 2,
         ("NaN", "nan")),
    Case("stats-nan-loss", lambda e: ["stats", str(e.write(
        "group,task,method,model,loss,mds\n1,a,linear,m1,-50,0.9\n1,b,linear,m2,nan,0.2\n"
        "2,a,ties,m1,-5,0.1\n", "records.csv"))], 0, ("1 of 3 records have no loss", "left out")),
    Case("card-template-front-matter", lambda e: _card(e, "---\nlicense: [apache\n---\n"
                                                          "# {{ model_name }}\n"),
         2, ("t.md", "front matter", "not valid YAML at line 2")),
    Case("card-template-jinja", lambda e: _card(e, "---\nlicense: apache-2.0\n---\n"
                                                   "{{ model_name }\n"), 2,
         ("t.md", "TemplateSyntaxError", "unexpected '}'")),
    # ---- Ctrl-C: exit 130, outputs whole or absent
    # (tests/test_nothing_lost.py checks what is left)
    Case("ctrl-c-mid-extraction", _ctrl_c_extracting, 130, ("interrupted", "rerun")),
    Case("ctrl-c-mid-merge", _ctrl_c_merging, 130, ("interrupted", "rerun")),
    Case("ctrl-c-mid-merge-mergekit-yaml", lambda e: _ctrl_c_merging(e, "yaml"), 130,
         ("interrupted", "rerun"), entry="yaml"),
    # ---- the Hub: exit 4, the status and the repository named, never the token
    Case("push-no-token", lambda e: _push(e), 4, ("no Hub token", "HF_TOKEN"), hub=True),
    Case("push-token-rejected", lambda e: _push(e, token="hf_notAValidToken"), 4,
         ("alice/merged", "HTTP 401", "nothing was committed"), hub=True),
    Case("push-forbidden", lambda e: _push(e, "bob/theirs", token=TOKEN), 4,
         ("bob/theirs", "HTTP 403"), hub=True),
    Case("push-revision-missing", lambda e: (e.hub.create("alice/merged"), _push(
        e, "alice/merged", "--exist-ok", "--create-pr", "--revision", "no-such-branch",
        token=TOKEN))[1],
         4, ("alice/merged", "HTTP 404"), hub=True),
    Case("push-server-error", lambda e: (e.hub.faults.update(commit=503), _push(e, token=TOKEN))[1],
         4, ("alice/merged", "HTTP 503", "nothing was committed"), hub=True),
    Case("push-connection-refused", lambda e: _push(e, token=TOKEN, endpoint=_dead_endpoint()), 4,
         ("alice/merged", "cannot reach"), hub=True),
    # ---- click usage errors: one line too
    Case("usage-unknown-option", lambda e: ["check", e.config(), "--budjet", "1"], 2,
         ("No such option", "--budjet", "--budget")),
    Case("usage-unknown-command", lambda e: ["chek"], 2, ("No such command", "chek")),
    Case("usage-missing-argument", lambda e: ["check"], 2, ("Missing argument", "CONFIGS")),
    Case("usage-bad-choice", lambda e: ["check", e.config(), "--pooling", "max"], 2,
         ("--pooling", "max", "mean")),
    Case("usage-bad-number", lambda e: ["check", e.config(), "--k", "many"], 2, ("--k", "many")),
    # ---- reliability round 2 (issue 23)
    *[Case(f"name-too-long-{w}", lambda e, w=w: _long_name(e, w), 2, ("too long", "255"))
      for w in ("config", "model", "probe", "out")],
    Case("model-path-nul", lambda e: ["check", e.config("ft1", str(e.tmp / "a\0b")), *FAST], 2,
         ("NUL byte",)),
    Case("probe-file-nul", lambda e: _probe_file(e, "p\0.txt", None), 2,
         ("probe file", "NUL byte")),
    Case("cache-env-is-a-file", lambda e: _cache_at(e, "file"), 2,
         ("MERGEKIT_COLLAPSE_CACHE", "a_file", "not a folder")),
    Case("cache-under-a-file", lambda e: _cache_at(e, "under-a-file"), 2,
         ("cache", "a_file", "not a folder")),
    Case("cache-read-only-fs", lambda e: _cache_at(e, "read-only"), 2,
         ("cannot write the cache", "MERGEKIT_COLLAPSE_CACHE")),
    Case("calibrate-out-not-writable", lambda e: _calibrate_out(e, "under-a-file"), 2,
         ("--out", "a_file", "not a folder")),
    Case("calibrate-out-read-only-fs", lambda e: _calibrate_out(e, "read-only"), 2,
         ("--out", "cannot write")),
    Case("github-step-summary-unwritable",
         lambda e: _github_file_unwritable(e, "GITHUB_STEP_SUMMARY"), 0,
         ("GITHUB_STEP_SUMMARY", "cannot write")),
    Case("github-output-unwritable", lambda e: _github_file_unwritable(e, "GITHUB_OUTPUT"), 0,
         ("GITHUB_OUTPUT", "cannot write")),
    Case("card-report-not-json", lambda e: _card_with(e, "mergeability/report.json", b"{oops"), 2,
         ("report.json", "not a valid guard report")),
    Case("card-report-wrong-shape", lambda e: _card_with(e, "mergeability/report.json",
                                                         b'{"verdict": 5}'),
         2, ("report.json", "not a valid guard report")),
    Case("mergekit-yaml-bad-guard-action", lambda e: _merge(e, str(e.tmp / "out"), "--guard-action",
                                                            "explode", entry="yaml"),
         2, ("--guard-action", "explode", "abort"), entry="yaml"),
    Case("card-eval-task-300-chars", _card_long_task, 0, ()),
    Case("card-own-eval-results-not-utf8",
         lambda e: _card_with(e, ".eval_results/mine.yaml", b"\xff\xfe"), 0, ()),
    Case("card-own-eval-results-folder",
         lambda e: _card_with(e, ".eval_results/x.yaml", None, folder=True), 0, ()),
    Case("card-evaluation-not-utf8", lambda e: _card_with(e, "mergeability/evaluation.json",
                                                          b"\xff{}"), 2,
         ("evaluation.json", "not UTF-8")),
    Case("push-token-in-file-name", lambda e: _push_token_name(e), 4,
         ("refusing to push", "a file name holds the Hub token"), hub=True),
    Case("push-token-in-file-name-dry-run", lambda e: _push_token_name(e, "--dry-run"), 4,
         ("refusing to push", "a file name holds the Hub token"), hub=True),
    Case("push-named-pipe", _push_fifo, 2, ("pipe", "not a regular file")),
    Case("probe-jsonl-null", lambda e: _jsonl_probe(e, None), 2,
         ("p.jsonl:1", "'text'", "not a string")),
    Case("probe-jsonl-object", lambda e: _jsonl_probe(e, {"nested": 1}), 2,
         ("p.jsonl:1", "'text'", "not a string")),
    Case("stats-non-numeric-cell", lambda e: ["stats", str(e.write(
        "group,task,method,model,loss,mds\n1,a,linear,m1,-50,0.9\n1,b,linear,m2,-1,oops\n"
        "2,a,ties,m1,-5,0.1\n", "records.csv"))], 0, ("mds", "'oops'", "not a number")),
    Case("guard-base-differs", lambda e: ["check", str(e.write({**e.raw(), "guard": {
        **e.raw()["guard"], "base": e.ref("ft3")}})), *FAST, "--absolute-budget", "1e9"], 0,
         ("guard.base", "ft3", "not the config's base_model")),
    Case("guard-unknown-key-bracket", lambda e: ["check", str(e.write({**e.raw(), "guard": {
        **e.raw()["guard"], "[": 1}}))], 2, ("unknown key 'guard.['",)),
]


@pytest.fixture(scope="module")
def odd_zoo(tiny_zoo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Models that must not merge with the zoo, and broken copies of its base."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("odd")
    odd = {"wide": make_tiny_llama(root / "wide", seed=5, hidden=48),
           "deep": make_tiny_llama(root / "deep", seed=6, layers=3),
           "bigvocab": make_tiny_llama(root / "bigvocab", seed=7, vocab=300)}
    odd["lora_wide"] = make_lora(odd["wide"], root / "lora_wide", seed=8)
    odd["qwen"] = _tiny_qwen2(tiny_zoo["base"], root / "qwen")
    notok = odd["no_tokenizer"] = Path(shutil.copytree(tiny_zoo["ft1"], root / "no_tokenizer"))
    for f in notok.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            f.unlink()
    plain = odd["plain_ft"] = Path(shutil.copytree(tiny_zoo["ft1"], root / "plain_ft"))
    (plain / "chat_template.jinja").unlink(missing_ok=True)  # a tokenizer without a chat template
    tok_cfg = json.loads((plain / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    def copy(name: str) -> Path:
        odd[name] = Path(shutil.copytree(tiny_zoo["base"], root / name))
        return odd[name]

    weights = load_file(tiny_zoo["base"] / "model.safetensors")
    nan = {k: v.clone() for k, v in weights.items()}
    next(v for k, v in nan.items() if "q_proj" in k)[0, 0] = float("nan")
    save_file(nan, copy("nan") / "model.safetensors", metadata={"format": "pt"})
    # finite in float32, past float16's 65504 once the MLPs add to an embedding near its maximum
    big = {k: v.clone() for k, v in weights.items()}
    emb = next(k for k in big if "embed_tokens" in k)
    big[emb] *= 5e4 / big[emb].abs().max()
    for k in big:
        if "down_proj" in k:
            big[k] *= 1e6
    save_file(big, copy("overflow") / "model.safetensors", metadata={"format": "pt"})
    (copy("pickle") / "model.safetensors").unlink()
    torch.save(weights, odd["pickle"] / "pytorch_model.bin")
    data = (tiny_zoo["base"] / "model.safetensors").read_bytes()
    (copy("truncated") / "model.safetensors").write_bytes(data[: len(data) // 2])
    (copy("garbage") / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    config = json.loads((copy("remote") / "config.json").read_text())
    config |= {"model_type": "tiny_custom", "auto_map": {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyLM"}}
    (odd["remote"] / "config.json").write_text(json.dumps(config))
    return odd


def _tiny_qwen2(like: Path, path: Path) -> Path:
    """A Qwen2 model of the tiny base's shape and tokenizer: another architecture, nothing else."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    llama = AutoConfig.from_pretrained(like)
    cfg = Qwen2Config(**{k: getattr(llama, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "max_position_embeddings", "pad_token_id",
        "bos_token_id", "eos_token_id", "tie_word_embeddings")})
    torch.manual_seed(9)
    Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(like).save_pretrained(path)
    return path


def invoke(case: Case, env: Env) -> tuple[int, str]:
    """Run the case: (exit code, stderr)."""
    args = case.args(env)
    if case.entry == "yaml":
        from mergekit.scripts import run_yaml

        from mergekit_collapse.cli.mergekit_yaml import install_guard

        install_guard(run_yaml)
        res = CliRunner().invoke(run_yaml.main, args)
    else:
        res = CliRunner().invoke(main, args)
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), \
        f"{type(res.exception).__name__}: {res.exception}"
    return res.exit_code, res.stderr


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tiny_zoo, odd_zoo, tmp_path, monkeypatch, caplog, request):
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="mergekit_collapse")
    hub = request.getfixturevalue("hub") if case.hub else None
    code, stderr = invoke(case, Env(tmp_path, tiny_zoo, odd_zoo, monkeypatch, hub))
    if code == 0:  # a warning, logged (the CLI prints it as one stderr line)
        stderr = "".join(f"WARNING {r.name}: {r.getMessage()}\n" for r in caplog.records
                         if r.levelno >= logging.WARNING and r.name.startswith("mergekit_collapse"))
    lines = stderr.strip().splitlines()
    if record := os.environ.get("BAD_INPUTS_RECORD"):  # the docs table's raw material
        with open(record, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": case.id, "code": code,
                                "stderr": stderr.replace(str(tmp_path), "…")
                                }) + "\n")
    assert code == case.code, stderr
    assert "Traceback" not in stderr and TOKEN not in stderr
    if case.words:
        assert len(lines) == 1, stderr
        for word in case.words:
            assert word in lines[0], lines[0]
    else:
        assert not lines, stderr


def test_the_corpus_is_large_and_documented():
    ids = [c.id for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    docs = (Path(__file__).parents[2] / "docs" / "bad-inputs.md").read_text()
    missing = [i for i in ids if f"`{i}`" not in docs]
    assert not missing, f"docs/bad-inputs.md lacks {missing}"
