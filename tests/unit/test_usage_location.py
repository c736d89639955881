"""Where the SQLite ledger goes when ``usage.path`` is not set, and ``corral check``
naming a ledger file that cannot be kept (the read-only and permission cases run as a
unit would, in tests/integration/test_unit_starts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from corral.cli import main
from corral.usage.location import ledger_file


def test_the_default_is_the_state_directory_then_beside_the_configuration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "etc" / "corral.yaml"
    assert ledger_file("/srv/u.sqlite3", config, {"STATE_DIRECTORY": "/var/lib/corral"}) \
        == Path("/srv/u.sqlite3")
    # systemd lists one directory per StateDirectory= entry.
    assert ledger_file(None, config, {"STATE_DIRECTORY": "/var/lib/corral:/var/lib/x"}) \
        == Path("/var/lib/corral/corral-usage.sqlite3")
    assert ledger_file(None, config, {}) == tmp_path / "etc" / "corral-usage.sqlite3"
    monkeypatch.chdir(tmp_path)
    assert ledger_file(None, None, {}) == tmp_path / "corral-usage.sqlite3"


def _check(tmp_path: Path, usage: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    config = tmp_path / "corral.yaml"
    config.write_text("backends: [{url: 'http://127.0.0.1:11434'}]\n" + usage)
    done = CliRunner().invoke(main, ["check", "-q", "--config", str(config)], env=env)
    return done.exit_code, done.output


def test_check_names_a_ledger_file_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("")
    code, out = _check(tmp_path, f"usage: {{path: {tmp_path / 'a-dir'}}}\n")
    assert code == 1 and f"usage ledger: {tmp_path / 'a-dir'} is a directory" in out, out
    code, out = _check(tmp_path, f"usage: {{path: {tmp_path / 'a-file' / 'u.sqlite3'}}}\n")
    assert code == 1 and "is not a directory" in out, out
    # Directories the store would make are fine; nothing is made by the check.
    code, out = _check(tmp_path, f"usage: {{path: {tmp_path / 'new' / 'u.sqlite3'}}}\n")
    assert code == 0, out
    assert not (tmp_path / "new").exists()
    # Without a ledger, or with it in Redis, there is no file to check.
    code, out = _check(tmp_path, f"usage: {{path: {tmp_path / 'a-dir'}, enabled: false}}\n")
    assert code == 0, out
    code, out = _check(tmp_path, "usage: {}\n", {"STATE_DIRECTORY": str(tmp_path / "a-dir")})
    assert code == 0, out
