"""The guard's flags are generated from the pydantic `guard:` model: the same flags, help and
choices on check, merge, run and the mergekit-yaml hook; a flag overrides the YAML; bad budgets exit
2."""

from __future__ import annotations

import importlib
import json
import typing

import click
import pytest
from click.testing import CliRunner
from common import tiny_config

from mergekit_collapse.cli import main
from mergekit_collapse.cli.options import GUARD_FLAGS, PREFIX, RuntimeOptions
from mergekit_collapse.guard.config import action_names

#: the flags users already have: none may disappear
EXISTING = {"budget", "absolute_budget", "action", "weights", "rehearse", "layer", "pooling", "k",
            "seed", "jung_dim", "base"}


def _params(command: str) -> dict[str, click.Option]:
    """Flag -> option of a mergekit-collapse command, or of mergekit-yaml ("hook")."""
    if command == "hook":
        from mergekit_collapse.cli.mergekit_yaml import install_guard

        module = importlib.import_module("mergekit.scripts.run_yaml")
        install_guard(module)  # idempotent: the .pth hook has usually done it already
        cmd = module.main
    else:
        cmd = main.get_command(click.Context(main), command)
    params = cmd.get_params(click.Context(cmd))
    return {flag: p for p in params if isinstance(p, click.Option) for flag in p.opts}


def _choices(annotation: typing.Any) -> tuple | None:
    """The values of a `Literal` annotation (also inside `X | None`), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    inner = [_choices(a) for a in typing.get_args(annotation)]
    return next((c for c in inner if c), None)


@pytest.mark.parametrize("command,prefix", [("check", ""), ("merge", PREFIX), ("run", PREFIX),
                                            ("hook", PREFIX)])
def test_every_guard_flag_on_every_command(command, prefix):
    assert set(GUARD_FLAGS) >= EXISTING
    params = _params(command)
    for key, (model, name) in GUARD_FLAGS.items():
        flag = f"--{prefix}{key.replace('_', '-')}"
        assert flag in params, f"{command} lacks {flag}"
        option, field = params[flag], model.model_fields[name]
        assert field.description and field.description in option.help
        assert option.default is None  # unset: the YAML decides
        if name == "action":
            assert list(option.type.choices) == action_names()
        elif (values := _choices(field.annotation)) is not None:
            assert tuple(option.type.choices) == values  # a new Literal value shows up here
        else:
            assert not isinstance(option.type, click.Choice)


def test_runtime_flags_come_from_one_model():
    check, merge = _params("check"), _params("merge")
    for key in ("device", "dtype", "cache_dir", "allow_pickle", "trust_remote_code", "no_progress"):
        option = check[f"--{key.replace('_', '-')}"]
        assert option.help == RuntimeOptions.model_fields[key].description
    for key in ("report", "merge_all", "cache_dir"):
        option = merge[f"--guard-{key.replace('_', '-')}"]
        assert option.help == RuntimeOptions.model_fields[key].description
    assert check["--device"].default == "auto" and check["--allow-pickle"].is_flag
    assert _params("demo")["--action"].default == "drop"
    plan = _params("plan")
    assert plan["--dtype"].help == RuntimeOptions.model_fields["dtype"].description


def test_one_runtime_object_through_the_api():
    """`check`, `run_guard`, `prefill_rehearsals`, `guarded_merge`, `run_pipeline` and `plan` take
    one `Runtime`, none of its fields one by one; the flags build it, mergekit's options too."""
    import inspect

    from mergekit.options import MergeOptions

    from mergekit_collapse import Runtime, check, plan, run_pipeline
    from mergekit_collapse.guard.assess import prefill_rehearsals, run_guard
    from mergekit_collapse.merge import guarded_merge, merge_runtime

    fields = set(Runtime.model_fields)
    for fn in (check, run_guard, prefill_rehearsals, guarded_merge, run_pipeline, plan):
        params = set(inspect.signature(fn).parameters)
        assert "runtime" in params and not params & fields, fn.__name__
    flags = RuntimeOptions(device="cpu", dtype="float32", cache_dir="c", no_progress=True)
    assert flags.runtime() == Runtime(device="cpu", dtype="float32", cache_dir="c", progress=False)
    merged = merge_runtime(MergeOptions(device="cuda", trust_remote_code=True, quiet=True),
                           cache_dir="c")
    assert merged == Runtime(device="cuda", trust_remote_code=True, progress=False, cache_dir="c")


def test_a_flag_overrides_the_yaml(tiny_zoo, tmp_path):
    cfg = tiny_config(tmp_path, tiny_zoo, pooling="mean", rehearse="off")
    runner = CliRunner()
    base = ["check", str(cfg), "--format", "json", "--absolute-budget", "1e9", "--no-progress"]
    plain = json.loads(runner.invoke(main, base).stdout)
    assert (plain["probes"]["k"], plain["pooling"], plain["layer"]) == (2, "mean", -1)
    res = runner.invoke(main, [*base, "--k", "1", "--pooling", "last", "--layer", "0"])
    assert res.exit_code == 0, res.output
    flagged = json.loads(res.stdout)
    assert (flagged["probes"]["k"], flagged["pooling"], flagged["layer"]) == (1, "last", 0)


def test_merge_and_run_pass_the_new_flags_through(tiny_zoo, tmp_path):
    cfg = tiny_config(tmp_path, tiny_zoo, models=("ft1", "ft2"), rehearse="off")
    runner = CliRunner()
    for command, extra in (("merge", []), ("run", ["--no-eval"])):
        out = tmp_path / command
        res = runner.invoke(main, [command, str(cfg), str(out), "--guard-absolute-budget", "1e9",
                                   "--guard-k", "1", "--guard-pooling", "mean", "--quiet", *extra])
        assert res.exit_code == 0, res.output
        report = json.loads((out / "mergeability" / "report.json").read_text())
        assert (report["probes"]["k"], report["pooling"]) == (1, "mean"), command


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_budget_flag_exits_2_with_one_line(tiny_zoo, tmp_path, value):
    cfg = tiny_config(tmp_path, tiny_zoo)
    runner = CliRunner()
    for args in (["check", str(cfg), "--budget", value],
                 ["merge", str(cfg), str(tmp_path / "out"), "--guard-absolute-budget", value]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and "budget" in res.stderr
        assert not (tmp_path / "out").exists()


def test_guard_budget_0_does_not_switch_the_guard_off(tiny_zoo, tmp_path):
    """Without --guard, `--guard-budget 0` still means the guard (and is refused), not plain
    mergekit."""
    from mergekit_collapse.cli.mergekit_yaml import wants_guard

    assert wants_guard({"guard_budget": 0.0}) and not wants_guard({"guard_budget": None})
    module = importlib.import_module("mergekit.scripts.run_yaml")
    res = CliRunner().invoke(module.main, [str(tiny_config(tmp_path, tiny_zoo)),
                                           str(tmp_path / "out"), "--guard-budget", "0"])
    assert res.exit_code == 2 and not (tmp_path / "out").exists()
    assert len(res.stderr.strip().splitlines()) == 1

