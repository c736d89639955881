"""``corral status`` and ``corral top``: ``/corral/status`` as tables in a terminal.

Both read a running gateway over HTTP, so they work from any machine that can reach
it; nothing here imports the gateway itself.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

import click
from rich.console import Console, Group, JustifyMethod, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:8080"
STATUS_PATH = "/corral/status"
MAX_REJECTIONS_SHOWN = 10

_url_option = click.option(
    "--url", default=DEFAULT_URL, envvar="CORRAL_URL", show_default=True,
    help="The gateway's base URL (also $CORRAL_URL).")


class Unreachable(click.ClickException):
    pass


def status_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith(STATUS_PATH) else url + STATUS_PATH


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    target = status_url(url)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{target} answered {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot read {target}: {reason}") from None
    if not isinstance(data, dict) or "backends" not in data:
        raise Unreachable(f"{target} did not answer with Corral's status")
    return data


# -- rendering (pure: status dict in, rich renderables out) --------------------------------

def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.1f} s" if value >= 1000 else f"{value:.0f} ms"


def _uptime(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _rate(series: dict[str, list[Any]], key: str, last: int = 5) -> float | None:
    values = [v for v in series.get(key, [])[-last:] if v is not None]
    return sum(values) / len(values) if values else None


def backend_state(b: dict[str, Any]) -> tuple[str, str]:
    """A word for the backend's state and the style to print it in."""
    if not b.get("up"):
        return "down", "bold red"
    if b.get("draining"):
        return "draining", "yellow"
    if not b.get("routable", True):
        return ("breaker open" if b.get("breaker") == "open" else "out"), "yellow"
    return "up", "green"


def summary_line(status: dict[str, Any]) -> Text:
    series = status.get("series", {})
    recent = status.get("recent", {})
    queue = status.get("queue", {})
    rps, tps = _rate(series, "requests_per_s"), _rate(series, "tokens_out_per_s")
    by_class = ", ".join(f"{k} {v}" for k, v in queue.get("by_class", {}).items())
    text = Text()
    text.append(f"Corral {status.get('version', '?')}", style="bold")
    text.append(f" · up {_uptime(status.get('uptime_s', 0))}")
    text.append(f" · {rps:.1f} req/s" if rps is not None else " · – req/s")
    text.append(f" · {tps:.0f} tok/s out" if tps is not None else "")
    text.append(f" · TTFB p50 {_ms(recent.get('ttfb_p50_ms'))} (1 min)")
    text.append(f" · waiting {queue.get('depth', 0)}" + (f" ({by_class})" if by_class else ""))
    totals = status.get("totals")
    if totals:
        text.append(f" · served {totals.get('requests', 0)}")
    return text


def holds_text(b: dict[str, Any]) -> str:
    """What a backend holds: each resident model with its state, the requests running
    on it and its load time there (``*``: measured, else the configured default)."""
    holds = b.get("holds")
    if holds is None:
        return ", ".join(b.get("loaded", [])) or "–"
    parts = []
    for h in holds:
        text = h["model"]
        if h.get("state") == "loading":
            text += " (loading)"
        elif h.get("running"):
            text += f" ×{h['running']}"
        text += f" {h.get('load_time_s', 0):g}s" + ("*" if h.get("load_time_learned") else "")
        parts.append(text)
    room = b.get("max_models")
    return (", ".join(parts) or "–") + (f"  [{len(holds)}/{room}]" if room else "")


def backends_table(status: dict[str, Any]) -> Table:
    table = Table(title="Backends", title_justify="left", expand=False)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("backend", "left"), ("state", "left"), ("slots", "right"),
        ("holds (running, load time; * measured)", "left"),
        ("models", "right"), ("TTFB p50 1m", "right"), ("req 1m", "right"),
        ("last error", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for b in status.get("backends", []):
        word, style = backend_state(b)
        table.add_row(
            b.get("name", "?"), Text(word, style=style),
            f"{b.get('in_flight', 0)}/{b.get('slots', 0)}",
            holds_text(b),
            str(len(b.get("models", []))),
            _ms(b.get("ttfb_p50_ms_1m")),
            str(b.get("requests_1m", 0)),
            Text(b.get("last_error") or "", style="red"),
        )
    return table


def models_table(status: dict[str, Any]) -> Table | None:
    models = status.get("models") or []
    if not models:
        return None
    sched = status.get("scheduler") or {}
    title = (f"Models · {sched.get('loads', 0)} loads, "
             f"{sched.get('preemptions', 0)} preemptions so far")
    table = Table(title=title, title_justify="left")
    table.add_column("model")
    for name in ("demand /s", "queued", "running", "service", "tokens/s", "resident on"):
        table.add_column(name, justify="right" if name != "resident on" else "left")
    for m in models:
        service = m.get("service_s")
        decode = m.get("decode_tokens_per_s")
        table.add_row(str(m.get("model")), f"{m.get('demand_per_s', 0):.2f}",
                      str(m.get("queued", 0)), str(m.get("running", 0)),
                      "–" if service is None else f"{service:.2f} s",
                      "–" if decode is None else f"{decode:.0f}",
                      ", ".join(m.get("resident_on") or []) or "–")
    return table


def replicas_table(status: dict[str, Any]) -> Table | None:
    shared = status.get("shared")
    if not shared:
        return None
    store = "ok" if shared.get("store") == "ok" else (
        "unavailable, carrying on alone" if shared.get("alone") else "unavailable")
    table = Table(title=f"Replicas · {shared.get('waiting', 0)} waiting on all · store "
                        f"{store}", title_justify="left")
    for name in ("replica", "address", "version", "configuration", "role"):
        table.add_column(name)
    mismatched = set(shared.get("config_mismatch") or [])
    for r in shared.get("replicas") or []:
        rid = str(r.get("id"))
        table.add_row(rid + (" (this one)" if rid == shared.get("replica") else ""),
                      str(r.get("address") or "–"), str(r.get("version") or "–"),
                      Text(str(r.get("config") or "–"),
                           style="bold red" if rid in mismatched else ""),
                      "leader" if rid == shared.get("leader") else "replica")
    return table


def clients_table(status: dict[str, Any]) -> Table | None:
    clients = status.get("clients") or []
    if not clients:
        return None
    table = Table(title="Clients (last minute)", title_justify="left")
    table.add_column("client")
    for name in ("share", "tokens", "requests", "fair-share counter"):
        table.add_column(name, justify="right")
    for c in clients:
        table.add_row(str(c.get("name")), f"{100 * c.get('share', 0):.1f} %",
                      str(c.get("tokens", 0)), str(c.get("requests", 0)),
                      f"{c.get('counter', 0):.0f}")
    return table


def rejections_table(status: dict[str, Any]) -> Table | None:
    rejections = (status.get("rejections") or [])[:MAX_REJECTIONS_SHOWN]
    if not rejections:
        return None
    table = Table(title="Recent rejections", title_justify="left")
    for name in ("time", "client", "status", "rule / reason", "path"):
        table.add_column(name)
    for r in rejections:
        when = (datetime.fromtimestamp(r["time"]).strftime("%H:%M:%S")
                if r.get("time") else "–")
        table.add_row(when, str(r.get("client")), Text(str(r.get("status")), style="red"),
                      str(r.get("rule") or r.get("error") or r.get("limit") or ""),
                      str(r.get("path") or ""))
    return table


def render_status(status: dict[str, Any]) -> Group:
    parts: list[RenderableType] = [summary_line(status), backends_table(status)]
    for table in (replicas_table(status), models_table(status), clients_table(status),
                  rejections_table(status)):
        if table is not None:
            parts.append(table)
    return Group(*parts)


# -- commands ------------------------------------------------------------------------------

@click.command("status")
@_url_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_command(url: str, as_json: bool) -> None:
    """Show a running gateway's backends, queue, clients and recent rejections."""
    status = fetch_status(url)
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    Console().print(render_status(status))


@click.command("top")
@_url_option
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(min=0.2),
              help="Seconds between refreshes.")
def top_command(url: str, interval: float) -> None:
    """Like status, refreshed live until Ctrl-C."""
    status = fetch_status(url)    # fail at once when the URL is wrong
    try:
        with Live(render_status(status), auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                try:
                    view: RenderableType = render_status(fetch_status(url))
                except Unreachable as exc:
                    # A restarting gateway: keep trying, say so in place.
                    view = Text(f"{exc.message} — retrying", style="bold red")
                live.update(view, refresh=True)
    except KeyboardInterrupt:
        pass
