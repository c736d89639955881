"""``corral systemd``: write the units and the matching configuration."""

from __future__ import annotations

from pathlib import Path

import click

from corral.ops.systemd import Plan, parse_gpus, units


def _gpus(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return parse_gpus(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("systemd")
@click.option("--gpus", required=True, callback=_gpus,
              help="GPUs to run one Ollama each on: indexes or UUIDs, e.g. 0,1.")
@click.option("--parallel", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="OLLAMA_NUM_PARALLEL of each Ollama, and its slots in Corral.")
@click.option("--models-dir", default=None,
              help="OLLAMA_MODELS: where the Ollamas keep their models (shared).")
@click.option("--max-loaded", type=click.IntRange(1, 1000), default=None,
              help="OLLAMA_MAX_LOADED_MODELS of each Ollama (and max_loaded_models).")
@click.option("--first-port", type=click.IntRange(1, 65535), default=11434,
              show_default=True, help="The first Ollama's port; the next GPUs count up.")
@click.option("--listen", default="0.0.0.0:8080", show_default=True,
              help="Corral's listen address.")
@click.option("--ollama-bin", default="/usr/local/bin/ollama", show_default=True)
@click.option("--corral-bin", default="/usr/local/bin/corral", show_default=True)
@click.option("--config-path", default="/etc/corral/corral.yaml", show_default=True,
              help="Where corral.service reads its configuration.")
@click.option("--state", default="memory", show_default=True,
              help="Corral's state: memory, or redis://… for several replicas.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the files into this directory (else print them).")
def systemd_command(gpus: tuple[str, ...], parallel: int, models_dir: str | None,
                    max_loaded: int | None, first_port: int, listen: str, ollama_bin: str,
                    corral_bin: str, config_path: str, state: str, out: Path | None) -> None:
    """Unit files for one Ollama per GPU and a Corral in front of them.

    Writes ollama-gpu<N>.service (CUDA_VISIBLE_DEVICES, OLLAMA_HOST on consecutive
    loopback ports, OLLAMA_NUM_PARALLEL, OLLAMA_MODELS, Restart=always), corral.service
    (its ledger in StateDirectory=corral), corral.yaml with the matching backends
    block, and corral.sysusers for the user corral.service runs as.
    """
    if first_port + len(gpus) - 1 > 65535:
        raise click.BadParameter("the ports run past 65535", param_hint="--first-port")
    plan = Plan(gpus=gpus, parallel=parallel, models_dir=models_dir,
                max_loaded_models=max_loaded, first_port=first_port, listen=listen,
                ollama_bin=ollama_bin, corral_bin=corral_bin, config_path=config_path,
                state=state)
    files = units(plan)
    if out is None:
        for name, text in files.items():
            click.echo(f"# --- {name}\n{text}")
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    unit_names = " ".join(n for n in files if n.endswith(".service"))
    user, state_dir = plan.corral_user, f"/var/lib/{plan.state_directory}"
    # The order matters: the user exists before the files are given to its group, and
    # the check runs as that user, so it reads and writes what the service will.
    click.echo(f"""wrote {len(files)} files to {out}. To install:
  sudo install -D -m 0644 {out}/corral.sysusers /etc/sysusers.d/corral.conf
  sudo systemd-sysusers /etc/sysusers.d/corral.conf
  sudo cp {out}/*.service /etc/systemd/system/
  sudo install -D -o root -g {user} -m 0640 {out}/corral.yaml {config_path}
  sudo install -d -o {user} -g {user} -m 0750 {state_dir}
  sudo -u {user} corral check --config {config_path}
  sudo systemctl daemon-reload && sudo systemctl enable --now {unit_names}""")
