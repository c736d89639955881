"""What ships for deployment works with this Corral: the compose file's configuration
passes ``corral check`` and matches its services, the image runs ``corral serve`` as
an unprivileged user on that configuration, and every metric the Grafana dashboard
asks for is one Corral exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from corral.app import Gateway
from corral.cli import main
from corral.config import load_settings, load_settings_text
from corral.usage.location import ledger_file

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def test_the_compose_configuration_passes_check_and_matches_the_services() -> None:
    done = CliRunner().invoke(main, ["check", "-q", "--config", str(DEPLOY / "corral.yaml")])
    assert done.exit_code == 0, done.output
    settings = load_settings(DEPLOY / "corral.yaml")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    # Every backend is an Ollama service of the file, with as many slots as it runs.
    for b in settings.backends:
        host = b.url.split("//", 1)[1].split(":", 1)[0]
        assert host in services, host
        assert int(services[host]["environment"]["OLLAMA_NUM_PARALLEL"]) == b.max_concurrency
    assert settings.state.startswith("redis://redis:") and "redis" in services
    corral = services["corral"]
    assert "./corral.yaml:/etc/corral/corral.yaml:ro" in corral["volumes"]
    port = settings.listen_host_port[1]
    assert f"{port}:{port}" in corral["ports"]
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for name, s in services.items() if name.startswith("ollama-")]
    assert sorted(map(tuple, gpus)) == [("0",), ("1",)]      # one GPU each


def test_the_image_runs_corral_serve_unprivileged_on_the_mounted_configuration() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]                       # the stage that ships
    assert re.search(r"^FROM python:3\.1\d-slim$", final, re.M)
    user = re.search(r"^USER (\S+)$", final, re.M)
    assert user is not None and user.group(1) not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", final, re.M)
    assert entry is not None
    assert json.loads(entry.group(1)) == ["corral", "serve", "--config",
                                          "/etc/corral/corral.yaml"]
    # What the build stage copies is what `pip install .` needs (the package and its
    # metadata) and nothing the ignore file leaves out.
    ignored = (ROOT / ".dockerignore").read_text().split()
    for copied in ("pyproject.toml", "README.md", "corral"):
        assert copied in text and copied not in ignored


def test_the_images_ledger_goes_to_a_volume_its_user_owns() -> None:
    """The configuration is mounted read-only, so what Corral writes (the usage ledger
    with state: memory) goes to a volume the image's user owns: the default file is
    there, for the compose file's configuration and for one keeping state in memory."""
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]
    user = re.search(r"^USER (\S+)$", final, re.M)
    assert user is not None
    state = re.search(r"^\s*STATE_DIRECTORY=(\S+)$", final, re.M)
    assert state is not None
    state_dir = state.group(1)
    assert re.search(rf"install -d -o {user.group(1)} -g \S+ -m 07[0-7]0 {state_dir}$",
                     final, re.M)
    assert re.search(rf"^VOLUME {state_dir}$", final, re.M)
    for config in ((DEPLOY / "corral.yaml").read_text(), "state: memory\n"):
        settings = load_settings_text(config, "/etc/corral/corral.yaml", Path("/etc/corral"))
        if settings.state == "memory":
            path = ledger_file(settings.usage.path, "/etc/corral/corral.yaml",
                               {"STATE_DIRECTORY": state_dir})
            assert path.parent == Path(state_dir), path
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert f"corral-state:{state_dir}" in services["corral"]["volumes"]


def exported_metrics() -> dict[str, str]:
    """Metric family → type, as a gateway's /metrics declares them (# TYPE lines): one
    process, and a replica on a shared state store (nothing connects to build it)."""
    types: dict[str, str] = {}
    for state in ("memory", "redis://127.0.0.1:1/0"):
        gw = Gateway(load_settings_text(f"state: '{state}'\n"
                                        "backends: [{url: 'http://127.0.0.1:1'}]\n"))
        body, _ = gw.metrics.exposition(None)
        types.update(re.findall(r"^# TYPE (\S+) (\S+)$", body.decode(), re.M))
    return types


def _queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_metric_the_dashboard_asks_for_is_exported() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    types = exported_metrics()
    names = {n for q in _queries(dashboard) for n in re.findall(r"\bcorral_[a-z0-9_]+", q)}
    assert len(names) >= 15
    for name in sorted(names):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or types.get(base) == "histogram", (
            f"the dashboard asks for {name}, which Corral does not export")
    # Importable as is: a datasource input, panels with ids and positions.
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    assert all({"id", "gridPos", "type", "title"} <= set(p) for p in dashboard["panels"])
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("slots", "queue", "refusals", "first byte", "tokens per client",
                  "model loads", "replicas"):
        assert topic in titles, topic


def test_the_check_catches_a_metric_corral_does_not_export() -> None:
    types = exported_metrics()
    assert "corral_requests_total" in types and "corral_gpu_temperature" not in types
    assert "corral_replicas" in types and types["corral_slot_leases_lost_total"] == "counter"
