"""``corral systemd``: units an operator can install as written. Checked with
``systemd-analyze verify`` where the machine has it, else by parsing them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from corral.cli import main
from corral.config import load_settings_text
from corral.ops.systemd import Plan, parse_gpus, units

_RESTART = {"no", "always", "on-success", "on-failure", "on-abnormal", "on-abort",
            "on-watchdog"}
_KNOWN = {
    "Unit": {"Description", "After", "Wants"},
    "Service": {"ExecStart", "ExecStartPre", "ExecReload", "Environment", "User", "Group",
                "Restart", "RestartSec", "KillSignal", "TimeoutStopSec", "LimitNOFILE",
                "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                "StateDirectory", "StateDirectoryMode"},
    "Install": {"WantedBy"},
}


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as systemd reads it: sections of (key, value), keys may repeat.
    Raises ValueError on anything systemd would not take or we did not mean."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            if current not in _KNOWN:
                raise ValueError(f"line {n}: unknown section {current}")
            sections[current] = []
            continue
        if current is None or "=" not in line:
            raise ValueError(f"line {n}: not a key=value in a section: {line!r}")
        key, value = line.split("=", 1)
        if key not in _KNOWN[current]:
            raise ValueError(f"line {n}: unknown key {key} in [{current}]")
        if key == "Restart" and value not in _RESTART:
            raise ValueError(f"line {n}: Restart={value} is not a restart policy")
        if key.startswith("Exec") and not value.lstrip("-@").startswith("/"):
            raise ValueError(f"line {n}: {key} must start with an absolute path")
        sections[current].append((key, value))
    if "Service" not in sections or not any(k == "ExecStart" for k, _ in sections["Service"]):
        raise ValueError("no [Service] ExecStart")
    return sections


def check_units(directory: Path) -> None:
    """Fail as systemd would: ``systemd-analyze verify`` prints what it ignores on stderr
    and still exits 0, so both its status and its silence count."""
    files = sorted(directory.glob("*.service"))
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        done = subprocess.run([analyze, "verify", *map(str, files)], capture_output=True,
                              text=True, timeout=60, check=False)
        complaints = [line for line in (done.stdout + done.stderr).splitlines()
                      if any(f.name in line for f in files)]
        if done.returncode != 0 or complaints:
            raise ValueError(f"systemd-analyze verify: {done.stdout}{done.stderr}")
    for f in files:
        parse_unit(f.read_text())


def env(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    return dict(v.strip('"').split("=", 1) for k, v in unit["Service"] if k == "Environment")


def _plan(**kw: object) -> Plan:
    # Executables that exist here, so systemd-analyze can check the command lines.
    return Plan(gpus=("0", "1", "2"), ollama_bin="/bin/true", corral_bin=sys.executable,
                **kw)  # type: ignore[arg-type]


def test_one_ollama_per_gpu_on_consecutive_ports_and_the_matching_backends() -> None:
    files = units(_plan(parallel=4, models_dir="/srv/ollama models", max_loaded_models=2))
    assert list(files) == ["ollama-gpu0.service", "ollama-gpu1.service",
                           "ollama-gpu2.service", "corral.service", "corral.yaml",
                           "corral.sysusers"]
    for i in range(3):
        unit = parse_unit(files[f"ollama-gpu{i}.service"])
        assert env(unit) == {"CUDA_VISIBLE_DEVICES": str(i),
                             "OLLAMA_HOST": f"127.0.0.1:{11434 + i}",
                             "OLLAMA_NUM_PARALLEL": "4", "OLLAMA_MODELS": "/srv/ollama models",
                             "OLLAMA_MAX_LOADED_MODELS": "2"}
        assert ("Restart", "always") in unit["Service"]
    corral = parse_unit(files["corral.service"])
    after = dict(corral["Unit"])["After"]
    assert all(f"ollama-gpu{i}.service" in after for i in range(3))
    assert ("ExecReload", "/bin/kill -HUP $MAINPID") in corral["Service"]
    settings = load_settings_text(files["corral.yaml"], "corral.yaml")
    assert [(b.name, b.url, b.max_concurrency, b.max_loaded_models)
            for b in settings.backends] == [
        (f"gpu{i}", f"http://127.0.0.1:{11434 + i}", 4, 2) for i in range(3)]


def test_the_units_pass_systemds_own_check(tmp_path: Path) -> None:
    for name, text in units(_plan()).items():
        (tmp_path / name).write_text(text)
    check_units(tmp_path)
    # The check can fail: a unit with a restart policy systemd does not know.
    bad = tmp_path / "bad"
    bad.mkdir()
    text = units(_plan())["ollama-gpu0.service"].replace("Restart=always", "Restart=alwayz")
    (bad / "ollama-gpu0.service").write_text(text)
    with pytest.raises(ValueError, match="alwayz"):
        check_units(bad)


def test_gpu_lists() -> None:
    assert parse_gpus("0, 1,2") == ("0", "1", "2")
    assert parse_gpus("GPU-5a1f") == ("GPU-5a1f",)
    with pytest.raises(ValueError, match="'x' is not a GPU"):
        parse_gpus("0,x")
    with pytest.raises(ValueError, match="named twice"):
        units(Plan(gpus=("0", "0")))


def test_the_command_writes_the_files(tmp_path: Path) -> None:
    out = tmp_path / "units"
    done = CliRunner().invoke(main, ["systemd", "--gpus", "0,1", "--parallel", "2",
                                     "--out", str(out), "--state", "redis://r:6379/0"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == [
        "corral.service", "corral.sysusers", "corral.yaml", "ollama-gpu0.service",
        "ollama-gpu1.service"]
    # The install steps make the user before giving it the configuration, and check
    # the configuration as that user.
    steps = done.output.splitlines()
    order = [next(i for i, line in enumerate(steps) if word in line)
             for word in ("systemd-sysusers", "-g corral -m 0640", "sudo -u corral corral check",
                          "systemctl daemon-reload")]
    assert order == sorted(order), done.output
    settings = load_settings_text((out / "corral.yaml").read_text())
    # With Redis the ledger is kept there, so no file is named.
    assert settings.state == "redis://r:6379/0" and settings.usage.path is None
    refused = CliRunner().invoke(main, ["systemd", "--gpus", "a,b"])
    assert refused.exit_code == 2 and "'a' is not a GPU index" in refused.output


def test_the_ledger_is_kept_in_the_units_state_directory() -> None:
    """ProtectSystem=strict leaves the configuration's directory read-only to the
    service: the ledger goes to the one directory systemd makes writable for it."""
    files = units(_plan())
    service = dict(parse_unit(files["corral.service"])["Service"])
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "corral"
    settings = load_settings_text(files["corral.yaml"], "corral.yaml")
    assert settings.state == "memory"
    assert settings.usage.path == "/var/lib/corral/usage.sqlite3"


def test_the_sysusers_entry_makes_the_user_the_unit_runs_as(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.fail("systemd-sysusers is not on PATH: this test runs it on the generated "
                    "entry (install the systemd package)", pytrace=False)
    files = units(_plan())
    service = dict(parse_unit(files["corral.service"])["Service"])
    entry = tmp_path / "corral.conf"
    entry.write_text(files["corral.sysusers"])
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # --root: the users are written to root/etc/passwd, not to this machine's.
    done = subprocess.run([sysusers, f"--root={root}", str(entry)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (root / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (root / "etc" / "group").read_text().splitlines()}
    assert service["User"] in users and service["Group"] in groups
    assert int(users[service["User"]][2]) < 1000                # a system user
    assert users[service["User"]][6].endswith("/nologin")     # no login shell
