"""The units ``corral systemd`` writes start as written: corral.service's own command
lines, run as the unit runs them (an unprivileged user, the configuration's directory
read-only, the state directory writable; see ``unit_sandbox.py``), pass the check,
serve a request through Corral to a stand-in Ollama and keep its usage in the state
directory; and the check refuses a ledger the unit could not write, as serve would,
and a configuration it could not read."""

from __future__ import annotations

import shlex
import signal
import sqlite3
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.ops.systemd import Plan, units
from tests.integration.conftest import _wait_http, free_port, post_json
from tests.integration.unit_sandbox import as_unit, fail_if_no_sandbox, run_as_unit
from tests.unit.test_systemd import parse_unit


def _corral_bin() -> str:
    script = Path(sysconfig.get_path("scripts")) / "corral"
    if not script.exists():
        pytest.fail(f"no corral command at {script}: install Corral into this Python "
                    "(pip install -e .)", pytrace=False)
    return str(script)


class Unit:
    """corral.service and corral.yaml as `corral systemd` writes them, installed into
    a configuration directory and a state directory of this test."""

    def __init__(self, tmp_path: Path, backend_port: int) -> None:
        self.config_dir = tmp_path / "etc-corral"
        self.state_dir = tmp_path / "state"
        self.config_dir.mkdir(mode=0o755)
        self.state_dir.mkdir(mode=0o750)     # StateDirectoryMode=
        self.port = free_port()
        self.config = self.config_dir / "corral.yaml"
        plan = Plan(gpus=("0",), first_port=backend_port, listen=f"127.0.0.1:{self.port}",
                    corral_bin=_corral_bin(), config_path=str(self.config))
        files = units(plan)
        self.write_config(yaml.safe_load(files["corral.yaml"]))
        service = dict(parse_unit(files["corral.service"])["Service"])
        self.pre = shlex.split(service["ExecStartPre"])
        self.start = shlex.split(service["ExecStart"])
        self.state_name = service["StateDirectory"]

    def write_config(self, config: dict[str, Any]) -> None:
        self.config.write_text(yaml.safe_dump(config))
        self.config.chmod(0o640)        # as the install steps leave it

    def run(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return run_as_unit(command, self.config_dir, self.state_dir, self.state_name)


def test_the_generated_unit_starts_unprivileged_and_serves(tmp_path: Path,
                                                           start_sim: Any) -> None:
    sim = start_sim()
    unit = Unit(tmp_path, sim.port)
    check = unit.run(unit.pre)
    assert check.returncode == 0, f"ExecStartPre failed:\n{check.stderr}"

    log = tmp_path / "corral.log"
    proc = subprocess.Popen(as_unit(unit.start, unit.config_dir, unit.state_dir,
                                    unit.state_name),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{unit.port}"
    try:
        try:
            _wait_http(url + "/readyz", proc, log, timeout=60, need_ok=True)
        except RuntimeError:
            fail_if_no_sandbox(proc.poll(), log.read_text())
            raise
        reply = post_json(url + "/api/chat", {
            "model": "llama3.2", "stream": False,
            "messages": [{"role": "user", "content": "hello"}]})
        assert reply["done"] is True and reply["message"]["content"]
    finally:
        # SIGTERM, as systemctl stop sends (KillSignal=): the ledger is written out.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(45)                   # TimeoutStopSec=
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    # The usage went to the state directory, and nothing was written beside the
    # configuration (it could not have been: that directory is read-only).
    with sqlite3.connect(unit.state_dir / "usage.sqlite3") as db:
        rows = db.execute("SELECT model, SUM(requests) FROM usage GROUP BY model").fetchall()
    assert rows == [("llama3.2:latest", 1)]
    assert [p.name for p in unit.config_dir.iterdir()] == ["corral.yaml"]


def test_the_units_check_refuses_what_the_unit_could_not_use(tmp_path: Path,
                                                                 start_sim: Any) -> None:
    sim = start_sim()
    unit = Unit(tmp_path, sim.port)
    config = yaml.safe_load(unit.config.read_text())

    # Beside the configuration, as the default was: read-only under ProtectSystem=strict.
    beside = unit.config_dir / "corral-usage.sqlite3"
    unit.write_config({**config, "usage": {"path": str(beside)}})
    check = unit.run(unit.pre)
    assert check.returncode == 1
    assert f"usage ledger: {beside} cannot be written" in check.stderr
    assert "Read-only file system" in check.stderr
    # serve fails the same way, so the check spoke for it.
    serve = unit.run(unit.start)
    assert serve.returncode == 1 and "usage ledger" in serve.stderr, serve.stderr

    # A directory the unit's user may not write, though the mount is writable.
    locked = unit.state_dir / "locked"
    locked.mkdir(mode=0o555)
    unit.write_config({**config, "usage": {"path": f"/var/lib/{unit.state_name}/locked/"
                                                   "usage.sqlite3"}})
    check = unit.run(unit.pre)
    assert check.returncode == 1 and "Permission denied" in check.stderr, check.stderr

    # No usage.path: the default is the unit's state directory, not the configuration's.
    unit.write_config({k: v for k, v in config.items() if k != "usage"})
    check = unit.run(unit.pre)
    assert check.returncode == 0, check.stderr
    assert not list(unit.config_dir.glob("*.sqlite3*"))

    # A configuration the unit's user cannot read (installed root-only, say).
    unit.config.chmod(0o000)
    check = unit.run(unit.pre)
    assert check.returncode != 0
    assert f"'{unit.config}' is not readable" in check.stderr, check.stderr
