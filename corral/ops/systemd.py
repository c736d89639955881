"""``corral systemd``: unit files for one Ollama per GPU and a Corral in front of them.

Pure generation (``units`` returns file names and contents; nothing is written or
started here): one ``ollama-gpu<N>.service`` per GPU, pinned to it with
``CUDA_VISIBLE_DEVICES`` and listening on its own loopback port, one
``corral.service``, the ``corral.yaml`` whose ``backends:`` block matches the
units — so the slots Corral hands out are exactly the backends' ``OLLAMA_NUM_PARALLEL``
— and ``corral.sysusers``, which creates the user ``corral.service`` runs as.

``corral.service`` sees the file system read-only but for its state directory
(``ProtectSystem=strict``, ``StateDirectory=``), so the configuration keeps the usage
ledger there, never beside itself in ``/etc``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class Plan:
    gpus: tuple[str, ...]
    parallel: int = 1
    models_dir: str | None = None
    max_loaded_models: int | None = None
    first_port: int = 11434
    listen: str = "0.0.0.0:8080"
    ollama_bin: str = "/usr/local/bin/ollama"
    corral_bin: str = "/usr/local/bin/corral"
    config_path: str = "/etc/corral/corral.yaml"
    ollama_user: str = "ollama"
    corral_user: str = "corral"
    state: str = "memory"
    # Under /var/lib: systemd makes it, owned by the unit's user and writable in the
    # sandbox, and tells the service where it is ($STATE_DIRECTORY).
    state_directory: str = "corral"

    def port(self, index: int) -> int:
        return self.first_port + index

    def unit_name(self, gpu: str) -> str:
        return f"ollama-gpu{gpu}.service"

    @property
    def ledger_path(self) -> str:
        return f"/var/lib/{self.state_directory}/usage.sqlite3"


def _env(name: str, value: str) -> str:
    # systemd's Environment= takes "NAME=value" quoted as one word when it has spaces.
    pair = f"{name}={value}"
    return f'Environment="{pair}"' if any(c in pair for c in ' "\\') else f"Environment={pair}"


def ollama_unit(plan: Plan, index: int, gpu: str) -> str:
    env = [
        _env("CUDA_VISIBLE_DEVICES", gpu),
        _env("OLLAMA_HOST", f"127.0.0.1:{plan.port(index)}"),
        _env("OLLAMA_NUM_PARALLEL", str(plan.parallel)),
    ]
    if plan.models_dir:
        env.append(_env("OLLAMA_MODELS", plan.models_dir))
    if plan.max_loaded_models:
        env.append(_env("OLLAMA_MAX_LOADED_MODELS", str(plan.max_loaded_models)))
    lines = [
        "[Unit]",
        f"Description=Ollama on GPU {gpu} (a Corral backend, 127.0.0.1:{plan.port(index)})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        f"ExecStart={shlex.quote(plan.ollama_bin)} serve",
        *env,
        f"User={plan.ollama_user}",
        f"Group={plan.ollama_user}",
        "Restart=always",
        "RestartSec=3",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def corral_unit(plan: Plan) -> str:
    ollamas = " ".join(plan.unit_name(g) for g in plan.gpus)
    lines = [
        "[Unit]",
        "Description=Corral, the gateway in front of the Ollama backends",
        f"After=network-online.target {ollamas}",
        f"Wants=network-online.target {ollamas}",
        "",
        "[Service]",
        f"ExecStartPre={shlex.quote(plan.corral_bin)} check --quiet --config "
        f"{shlex.quote(plan.config_path)}",
        f"ExecStart={shlex.quote(plan.corral_bin)} serve --config "
        f"{shlex.quote(plan.config_path)}",
        # SIGHUP re-reads the configuration; SIGTERM lets streams finish first.
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=45",
        f"User={plan.corral_user}",
        f"Group={plan.corral_user}",
        f"StateDirectory={plan.state_directory}",
        # The ledger names clients; only the service's user and group read it.
        "StateDirectoryMode=0750",
        "Restart=always",
        "RestartSec=2",
        # One socket per client and one per backend request, for thousands of streams.
        "LimitNOFILE=65536",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ProtectHome=true",
        "PrivateTmp=true",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def corral_config(plan: Plan) -> str:
    backends = []
    for index, gpu in enumerate(plan.gpus):
        entry: dict[str, object] = {"url": f"http://127.0.0.1:{plan.port(index)}",
                                    "name": f"gpu{gpu}", "max_concurrency": plan.parallel}
        if plan.max_loaded_models:
            entry["max_loaded_models"] = plan.max_loaded_models
        backends.append(entry)
    config: dict[str, object] = {"listen": plan.listen, "state": plan.state,
                                 "backends": backends, "access_log": "stdout"}
    if plan.state == "memory":
        # With Redis the ledger is kept there; otherwise in the unit's state directory,
        # the one place the unit may write.
        config["usage"] = {"path": plan.ledger_path}
    head = ("# Written by `corral systemd`: one backend per GPU, each with as many slots as\n"
            "# its OLLAMA_NUM_PARALLEL. Add keys, tiers and limits below; `corral check`.\n")
    return head + yaml.safe_dump(config, sort_keys=False)


def sysusers(plan: Plan) -> str:
    """A sysusers.d entry: a system user and group for corral.service, made by
    ``systemd-sysusers`` (and again at every boot, a no-op when they exist)."""
    return (f"# Written by `corral systemd`: the user corral.service runs as.\n"
            f"# Install as /etc/sysusers.d/corral.conf, then run systemd-sysusers.\n"
            f'u {plan.corral_user} - "Corral gateway" /var/lib/{plan.state_directory}\n')


def units(plan: Plan) -> dict[str, str]:
    """File name → content, in the order an operator reads them."""
    if not plan.gpus:
        raise ValueError("at least one GPU is needed")
    if len(set(plan.gpus)) != len(plan.gpus):
        raise ValueError(f"a GPU is named twice: {','.join(plan.gpus)}")
    out = {plan.unit_name(g): ollama_unit(plan, i, g) for i, g in enumerate(plan.gpus)}
    out["corral.service"] = corral_unit(plan)
    out["corral.yaml"] = corral_config(plan)
    out["corral.sysusers"] = sysusers(plan)
    return out


def parse_gpus(text: str) -> tuple[str, ...]:
    """``0,1,2`` (or GPU UUIDs, as CUDA_VISIBLE_DEVICES takes them)."""
    gpus = tuple(g.strip() for g in text.split(",") if g.strip())
    for g in gpus:
        if not (g.isdigit() or g.startswith(("GPU-", "MIG-"))):
            raise ValueError(f"{g!r} is not a GPU index or UUID (0, 1, … or GPU-…)")
    return gpus
