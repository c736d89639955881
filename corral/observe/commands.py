"""``corral status`` and ``corral top``: ``/corral/status`` as tables in a terminal.

Both read a running gateway over HTTP, so they work from any machine that can reach
it; nothing here imports the gateway itself.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click
from rich.console import (
    Console,
    ConsoleOptions,
    Group,
    JustifyMethod,
    RenderableType,
    RenderResult,
)
from rich.live import Live
from rich.measure import Measurement
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


class Block:
    """One thing on as few lines as the width allows: its head, then its fields
    separated by `` · `` and broken only between fields (continuation lines indented),
    then each note on its own indented lines. A field is never cut in two unless it
    alone is wider than the terminal."""

    def __init__(self, head: Text, fields: Sequence[Text], notes: Sequence[Text] = (),
                 head_sep: str = "  ") -> None:
        self.head, self.fields, self.notes, self.head_sep = head, fields, notes, head_sep

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        line, sep = self.head.copy(), self.head_sep
        for field in self.fields:
            if line.cell_len + len(sep) + field.cell_len <= width:
                line.append(sep)
                line.append_text(field)
            else:
                yield line
                line = Text("  ")
                line.append_text(field)
            sep = " · "
        yield line
        for note in self.notes:
            if note.cell_len <= width - 2:
                yield Text("  ") + note
                continue
            for index, part in enumerate(note.wrap(console, max(width - 4, 8))):
                part.rstrip()
                yield Text("  " if index == 0 else "    ") + part


_UNBOUNDED = 1_000_000


class Fit:
    """A table when the terminal is wide enough for it with nothing wrapped, else
    the same rows stacked, one block each: a table squeezed into 80 columns breaks
    every row over several lines and cuts model names short."""

    def __init__(self, table: Table, blocks: Sequence[Block], legend: str = "") -> None:
        self.table, self.blocks, self.legend = table, blocks, legend
        if legend:
            table.caption, table.caption_justify = Text(legend), "left"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = self.table
        # Measured as if the terminal had no edge: its width with no cell wrapped.
        natural = Measurement.get(console, options.update_width(_UNBOUNDED), table).maximum
        if natural <= options.max_width:
            yield table
            return
        # Without the table's rules, a blank line tells one section from the last.
        yield Text("")
        if table.title:
            yield Text(str(table.title), style="table.title")
        yield from self.blocks
        if self.legend:
            yield Text(self.legend, style="table.caption")


def _fields(*pairs: tuple[str, str]) -> list[Text]:
    """Fields for a Block from (value, style) pairs."""
    return [Text(value, style=style) for value, style in pairs]


def summary_line(status: dict[str, Any]) -> Block:
    series = status.get("series", {})
    recent = status.get("recent", {})
    queue = status.get("queue", {})
    rps, tps = _rate(series, "requests_per_s"), _rate(series, "tokens_out_per_s")
    by_class = ", ".join(f"{k} {v}" for k, v in queue.get("by_class", {}).items())
    parts = [f"up {_uptime(status.get('uptime_s', 0))}",
             f"{rps:.1f} req/s" if rps is not None else "– req/s"]
    if tps is not None:
        parts.append(f"{tps:.0f} tok/s out")
    parts.append(f"TTFB p50 {_ms(recent.get('ttfb_p50_ms'))} (1 min)")
    parts.append(f"waiting {queue.get('depth', 0)}" + (f" ({by_class})" if by_class else ""))
    totals = status.get("totals")
    if totals:
        parts.append(f"served {totals.get('requests', 0)}")
    return Block(Text(f"Corral {status.get('version', '?')}", style="bold"),
                 [Text(part) for part in parts], head_sep=" · ")


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


HOLDS_LEGEND = ("holds: each model, ×requests running, its load time (* measured), "
                "[models held/room]; TTFB p50 and req/min over the last minute")


def backends_table(status: dict[str, Any]) -> Fit:
    backends = status.get("backends", [])
    # The error column only when there is an error: it is the widest when it is there.
    errors = any(b.get("last_error") for b in backends)
    table = Table(title="Backends", title_justify="left", expand=False)
    columns: list[tuple[str, JustifyMethod]] = [
        ("backend", "left"), ("state", "left"), ("slots", "right"), ("models", "right"),
        ("TTFB p50", "right"), ("req/min", "right"), ("holds", "left")]
    if errors:
        columns.append(("last error", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    blocks = []
    for b in backends:
        word, style = backend_state(b)
        name = str(b.get("name", "?"))
        slots = f"{b.get('in_flight', 0)}/{b.get('slots', 0)}"
        models, ttfb = len(b.get("models", [])), _ms(b.get("ttfb_p50_ms_1m"))
        requests, holds, error = b.get("requests_1m", 0), holds_text(b), b.get("last_error")
        row: list[RenderableType] = [Text(name), Text(word, style=style), slots,
                                     str(models), ttfb, str(requests), Text(holds)]
        if errors:
            row.append(Text(error or "", style="red"))
        table.add_row(*row)
        notes = [Text(f"holds {holds}")]
        if error:
            notes.append(Text(f"last error: {error}", style="red"))
        blocks.append(Block(Text(name, style="bold"), _fields(
            (word, style), (f"slots {slots}", ""),
            (f"{models} model" + ("" if models == 1 else "s"), ""),
            (f"TTFB p50 {ttfb}", ""), (f"{requests} req/min", "")), notes))
    return Fit(table, blocks, HOLDS_LEGEND if backends else "")


def models_table(status: dict[str, Any]) -> Fit | None:
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
    blocks = []
    for m in models:
        service = m.get("service_s")
        decode = m.get("decode_tokens_per_s")
        cells = (f"{m.get('demand_per_s', 0):.2f}", str(m.get("queued", 0)),
                 str(m.get("running", 0)), "–" if service is None else f"{service:.2f} s",
                 "–" if decode is None else f"{decode:.0f}",
                 ", ".join(m.get("resident_on") or []) or "–")
        table.add_row(Text(str(m.get("model"))), *map(Text, cells))
        blocks.append(Block(Text(str(m.get("model")), style="bold"), _fields(
            (f"{cells[0]} demand/s", ""), (f"{cells[1]} queued", ""),
            (f"{cells[2]} running", ""), (f"service {cells[3]}", ""),
            (f"{cells[4]} tokens/s", ""), (f"on {cells[5]}", ""))))
    return Fit(table, blocks)


def replicas_table(status: dict[str, Any]) -> Fit | None:
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
    blocks = []
    for r in shared.get("replicas") or []:
        rid = str(r.get("id"))
        name = rid + (" (this one)" if rid == shared.get("replica") else "")
        address, version = str(r.get("address") or "–"), str(r.get("version") or "–")
        config = str(r.get("config") or "–")
        config_style = "bold red" if rid in mismatched else ""
        role = "leader" if rid == shared.get("leader") else "replica"
        table.add_row(Text(name), Text(address), Text(version),
                      Text(config, style=config_style), role)
        blocks.append(Block(Text(name, style="bold"), _fields(
            (address, ""), (f"version {version}", ""),
            (f"configuration {config}", config_style), (role, ""))))
    return Fit(table, blocks)


def clients_table(status: dict[str, Any]) -> Fit | None:
    clients = status.get("clients") or []
    if not clients:
        return None
    table = Table(title="Clients (last minute)", title_justify="left")
    table.add_column("client")
    for name in ("share", "tokens", "requests", "fair-share counter"):
        table.add_column(name, justify="right")
    blocks = []
    for c in clients:
        cells = (f"{100 * c.get('share', 0):.1f} %", str(c.get("tokens", 0)),
                 str(c.get("requests", 0)), f"{c.get('counter', 0):.0f}")
        table.add_row(Text(str(c.get("name"))), *cells)
        blocks.append(Block(Text(str(c.get("name")), style="bold"), _fields(
            (cells[0], ""), (f"{cells[1]} tokens", ""), (f"{cells[2]} requests", ""),
            (f"fair-share counter {cells[3]}", ""))))
    return Fit(table, blocks)


def rejections_table(status: dict[str, Any]) -> Fit | None:
    rejections = (status.get("rejections") or [])[:MAX_REJECTIONS_SHOWN]
    if not rejections:
        return None
    table = Table(title="Recent rejections", title_justify="left")
    for name in ("time", "client", "status", "rule / reason", "path"):
        table.add_column(name)
    blocks = []
    for r in rejections:
        when = (datetime.fromtimestamp(r["time"]).strftime("%H:%M:%S")
                if r.get("time") else "–")
        cells = (str(r.get("client")), str(r.get("status")),
                 str(r.get("rule") or r.get("error") or r.get("limit") or ""),
                 str(r.get("path") or ""))
        table.add_row(when, Text(cells[0]), Text(cells[1], style="red"), Text(cells[2]),
                      Text(cells[3]))
        blocks.append(Block(Text(when), _fields(
            (cells[0], "bold"), (cells[1], "red"), (cells[2], ""), (cells[3], ""))))
    return Fit(table, blocks)


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
