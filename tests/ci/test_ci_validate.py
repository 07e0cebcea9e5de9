"""`mergekit-collapse validate`: every kind of broken config is one line naming its file and line;
YAML that is not a mergekit config is skipped; no model is loaded."""

from __future__ import annotations

from ci_common import BROKEN_KINDS, NOT_CONFIGS, VALID, cli, write_files


def test_each_kind_of_broken_config_is_one_line(tiny_zoo, tmp_path, monkeypatch):
    (tmp_path / "zoo").mkdir()
    for name in ("ft1", "ft2"):
        (tmp_path / "zoo" / name).symlink_to(tiny_zoo[name], target_is_directory=True)
    write_files(tmp_path, {**BROKEN_KINDS, **NOT_CONFIGS, **VALID})
    monkeypatch.chdir(tmp_path)

    res = cli("validate", ".")
    assert res.exit_code == 2, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == len(BROKEN_KINDS)  # one line per broken file, nothing for the others
    got = {line.split(":", 1)[0]: line for line in lines}
    for name, (_, message, line) in BROKEN_KINDS.items():
        assert got[name].startswith(f"{name}:{line}: ") and message in got[name], got[name]

    assert cli("validate", *VALID, *NOT_CONFIGS).exit_code == 0
    assert cli("validate", "--require-guard", "unguarded.yml").exit_code == 2
    res = cli("validate", "--format", "github", "typo.yml")
    assert res.stdout.startswith("::error file=typo.yml,line=6,") and res.exit_code == 2
