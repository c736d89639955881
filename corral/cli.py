"""``corral`` command line: serve | check | simulate | demo | bench."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import orjson

from corral import __version__
from corral.config import ConfigError, Settings, config_warnings, load_settings
from corral.runtime import run_async, setup_logging


def _load(config: Path | None, verdict: str) -> Settings:
    """The settings, or every error and then ``verdict`` on stderr and exit 1."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        for line in exc.errors:
            click.echo(f"corral: {line}", err=True)
        click.echo(f"corral: {verdict}", err=True)
        sys.exit(1)


@click.group()
@click.version_option(__version__, prog_name="corral")
def main() -> None:
    """Corral: a gateway in front of Ollama servers."""


@main.command()
@click.option("--config", "-c", type=click.Path(path_type=Path), default=None,
              help="YAML configuration (default: one backend at 127.0.0.1:11434).")
@click.option("--listen", default=None, help="Override the listen address (host:port).")
@click.option("--log-level", default="info", show_default=True)
def serve(config: Path | None, listen: str | None, log_level: str) -> None:
    """Run the gateway."""
    setup_logging(log_level)
    settings = _load(config, "configuration is invalid; nothing started")
    for warning in config_warnings(settings):
        logging.getLogger("corral").warning("%s: %s", config or "configuration", warning)
    if listen:
        settings = Settings.model_validate({**settings.model_dump(), "listen": listen})
    if settings.tls is not None:
        from corral.web.tls import TlsError, load

        try:
            load(settings.tls)
        except TlsError as exc:
            click.echo(f"corral: {exc}; nothing started", err=True)
            sys.exit(1)
        # An expired certificate still serves (clients decide), as nginx does: a
        # restart must not turn a renewal that failed into an outage.
        expired, expiring = _tls_problems(settings)
        for line in expired + expiring:
            logging.getLogger("corral").warning("%s", line)
    if settings.state != "memory":
        problem = _redis_problem(settings.state)
        if problem is not None:
            if settings.queue.on_store_error == "deny":
                # Nothing could be served: refuse now rather than answer 503 forever.
                click.echo(f"corral: {problem}", err=True)
                click.echo("corral: queue.on_store_error is deny, so Corral does not start "
                           "without it (allow would carry on with a share of the slots); "
                           "nothing started", err=True)
                sys.exit(1)
            logging.getLogger("corral").warning(
                "%s; carrying on alone with a share of the slots until it answers "
                "(queue.on_store_error: allow)", problem)
    from corral.app import serve as serve_app

    def ready(url: str) -> None:
        click.echo(f"corral {__version__} listening on {url} "
                   f"({len(settings.backends)} backend(s))", err=True)

    from corral.usage.store import UsageStoreError

    try:
        run_async(serve_app(settings, ready, str(config) if config else None))
    except UsageStoreError as exc:
        click.echo(f"corral: usage ledger: {exc}; set usage.path to a writable file, or "
                   "usage.enabled: false", err=True)
        sys.exit(1)


@main.command()
@click.option("--config", "-c", type=click.Path(path_type=Path), required=True)
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
def check(config: Path, quiet: bool) -> None:
    """Validate a configuration file (like nginx -t); exit 1 when invalid."""
    settings = _load(config, f"the configuration file {config} is invalid")
    if not quiet:
        click.echo(orjson.dumps(settings.model_dump(mode="json"),
                                option=orjson.OPT_INDENT_2).decode())
    warnings = config_warnings(settings)
    if settings.state != "memory":
        problem = _redis_problem(settings.state)
        if problem is not None:
            warnings.append(problem)
    errors: list[str] = []
    if settings.tls is not None:
        tls_errors, tls_warnings = _tls_problems(settings)
        errors += tls_errors
        warnings += tls_warnings
    if settings.usage.enabled and settings.state == "memory":
        errors += _ledger_problems(settings, config)
    for warning in warnings:
        click.echo(f"corral: {config}: warning: {warning}", err=True)
    if errors:
        for error in errors:
            click.echo(f"corral: {config}: {error}", err=True)
        click.echo(f"corral: the configuration file {config} is not usable", err=True)
        sys.exit(1)
    click.echo(f"corral: the configuration file {config} is valid", err=True)


def _ledger_problems(settings: Settings, config: Path) -> list[str]:
    """The SQLite ledger as this process would keep it: run as the service's user (a
    unit's ExecStartPre is), the check sees the permissions and read-only mounts the
    service will."""
    from corral.usage.location import ledger_file, problem

    path = ledger_file(settings.usage.path, config)
    found = problem(path)
    if found is None:
        return []
    hint = ("set usage.path to a file in a directory the service's user can write (a "
            "systemd unit's StateDirectory=, /var/lib/corral for corral.service), or "
            "usage.enabled: false")
    return [f"usage ledger: {found}; {hint}"]


def _tls_problems(settings: Settings) -> tuple[list[str], list[str]]:
    import datetime as dt

    from corral.web.tls import problems

    assert settings.tls is not None
    return problems(settings.tls, dt.datetime.now(dt.UTC))


def _redis_problem(url: str, timeout: float = 2.0) -> str | None:
    """Why the state store cannot be reached now, or None when it answers a PING."""
    import re

    import redis

    shown = re.sub(r"//[^@/]*@", "//***@", url)
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        return f"state: Redis at {shown} refuses the credentials: {exc}"
    except (redis.RedisError, OSError) as exc:
        return f"state: Redis at {shown} cannot be reached now: {exc}"
    finally:
        client.close()
    return None


@main.group()
def keys() -> None:
    """API key helpers."""


@keys.command("hash")
@click.argument("key", required=False)
def keys_hash(key: str | None) -> None:
    """Print the key_sha256 form of KEY (read from stdin when not given), so the
    configuration need not hold the key itself."""
    from corral.pipeline.identify import hash_key

    if key is None:
        key = sys.stdin.readline().rstrip("\n")
    if not key:
        raise click.UsageError("an empty key cannot be hashed")
    click.echo(hash_key(key))


def _register_optional() -> None:
    # Sub-commands living in their own packages (each owns its options).
    from corral.bench.command import bench_command
    from corral.demo import demo_command
    from corral.observe.commands import status_command, top_command
    from corral.ops.command import systemd_command
    from corral.simulate.command import simulate_command
    from corral.usage.command import usage_command

    main.add_command(simulate_command, "simulate")
    main.add_command(demo_command, "demo")
    main.add_command(bench_command, "bench")
    main.add_command(status_command, "status")
    main.add_command(top_command, "top")
    main.add_command(systemd_command, "systemd")
    main.add_command(usage_command, "usage")


_register_optional()


if __name__ == "__main__":  # pragma: no cover
    main()
