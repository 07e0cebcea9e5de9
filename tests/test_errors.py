"""Our errors are also the standard errors they resemble (as huggingface_hub's are); exit codes
stay."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from common import QUIET, tiny_config

from mergekit_collapse.cli import main
from mergekit_collapse.errors import (
    BadInputError,
    CollapseError,
    ConfigError,
    GuardStoppedError,
    HubError,
    ModelNotFoundError,
)
from mergekit_collapse.guard import check


def test_exit_codes_and_standard_bases():
    assert [c.exit_code for c in (CollapseError, BadInputError, ConfigError, ModelNotFoundError,
                                  GuardStoppedError, HubError)] == [1, 2, 2, 2, 3, 4]
    assert issubclass(BadInputError, ValueError) and issubclass(ConfigError, BadInputError)
    assert (issubclass(ModelNotFoundError, FileNotFoundError)
            and issubclass(ModelNotFoundError, ValueError))
    assert not issubclass(GuardStoppedError, ValueError)  # a verdict, not bad input
    e = HubError("push failed: 403", status=403, repo_id="org/name")
    assert (e.status, e.repo_id, str(e)) == (403, "org/name", "push failed: 403")
    assert str(ModelNotFoundError("model 'x' not found")) == "model 'x' not found"


def _missing_model_config(tmp_path, zoo):
    path = tiny_config(tmp_path, zoo, models=("ft1", "ft2"))
    raw = yaml.safe_load(path.read_text())
    missing = str(tmp_path / "no-such-model")
    raw["models"][1]["model"] = missing
    raw["guard"]["tasks"][missing] = raw["guard"]["tasks"].pop(str(zoo["ft2"]))
    path.write_text(yaml.safe_dump(raw))
    return path, missing


def test_a_missing_local_model_is_a_file_not_found_error(tiny_zoo, tmp_path):
    path, missing = _missing_model_config(tmp_path, tiny_zoo)
    with pytest.raises(FileNotFoundError) as info:
        check(path, runtime=QUIET, rehearse="off")
    assert isinstance(info.value, BadInputError) and isinstance(info.value, ModelNotFoundError)
    assert missing in str(info.value)
    res = CliRunner().invoke(main, ["check", str(path), "--rehearse", "off", "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0] and "Traceback" not in res.output


def test_a_missing_config_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        check(tmp_path / "nope.yml")
    res = CliRunner().invoke(main, ["check", str(tmp_path / "nope.yml")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("guard", [{"k": 0}, {"pooling": "max"}, {"pooling_mode": "mean"}])
def test_a_malformed_guard_section_is_a_value_error(tiny_zoo, tmp_path, guard):
    path = tiny_config(tmp_path, tiny_zoo, **guard)
    with pytest.raises(ValueError, match="guard") as info:
        check(path, runtime=QUIET)
    assert isinstance(info.value, ConfigError) and info.value.exit_code == 2
    res = CliRunner().invoke(main, ["check", str(path)])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
