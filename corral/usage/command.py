"""``corral usage``: the ledger of a running gateway as a table or CSV.

It reads ``/corral/usage`` over HTTP like ``corral status`` reads the status, so it
works from any machine that can reach the gateway, with the caller's key deciding
what it may see.
"""

from __future__ import annotations

import csv
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from corral.usage.report import FIELDS

DEFAULT_URL = "http://127.0.0.1:8080"
USAGE_PATH = "/corral/usage"
CSV_COLUMNS = ("requests", "tokens_in", "tokens_out", "refused", "refusals", "errors",
               "avg_ms", "avg_first_byte_ms", "total_ms", "first_byte_ms")


def fetch_usage(url: str, params: dict[str, str], key: str | None,
                timeout: float = 30.0) -> dict[str, Any]:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v})
    target = f"{url.rstrip('/')}{USAGE_PATH}" + (f"?{query}" if query else "")
    request = urllib.request.Request(target)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise click.ClickException(f"{target} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read {target}: "
                                   f"{getattr(exc, 'reason', exc)}") from None
    return data


def _refusals(r: dict[str, Any]) -> str:
    return " ".join(f"{rule}={n}" for rule, n in r["refusals"].items())


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def usage_table(data: dict[str, Any]) -> Table:
    by = data["by"]
    who = f" for {data['client']}" if data.get("client") else ""
    table = Table(title=f"Usage {data['from']} to {data['to']} (UTC){who}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for field in by:
        table.add_column(field, no_wrap=True)
    for name in ("requests", "tok in", "tok out", "refused", "errors", "avg ms",
                 "ttfb ms"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("refusals")
    for r in [*data["rows"], {**data["totals"], **{f: "" for f in by}, by[0]: "total"}]:
        table.add_row(*(str(r[f]) for f in by), f"{r['requests']:,}", f"{r['tokens_in']:,}",
                      f"{r['tokens_out']:,}", f"{r['refused']:,}", f"{r['errors']:,}",
                      _ms(r["avg_ms"]), _ms(r["avg_first_byte_ms"]), _refusals(r),
                      end_section=r is data["rows"][-1] if data["rows"] else False)
    return table


def write_csv(data: dict[str, Any], out: Any) -> None:
    writer = csv.writer(out)
    writer.writerow([*data["by"], *CSV_COLUMNS])
    for r in data["rows"]:
        writer.writerow([*(r[f] for f in data["by"]),
                         *(_refusals(r) if c == "refusals" else
                           ("" if r[c] is None else r[c]) for c in CSV_COLUMNS)])


@click.command("usage")
@click.option("--url", default=DEFAULT_URL, envvar="CORRAL_URL", show_default=True,
              help="The gateway's base URL (also $CORRAL_URL).")
@click.option("--key", envvar="CORRAL_KEY", default=None,
              help="API key (also $CORRAL_KEY): an admin key reads everyone's usage, "
                   "another key its own.")
@click.option("--from", "first", default=None, metavar="YYYY-MM-DD",
              help="First UTC day (default: six days before --to).")
@click.option("--to", "last", default=None, metavar="YYYY-MM-DD",
              help="Last UTC day (default: today).")
@click.option("--by", default="client", show_default=True,
              help=f"Group by these, comma-separated: {', '.join(FIELDS)}.")
@click.option("--client", default=None, help="Only this client (key name or IP).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout, for a spreadsheet.")
@click.option("--json", "as_json", is_flag=True, help="The answer as JSON.")
def usage_command(url: str, key: str | None, first: str | None, last: str | None, by: str,
                  client: str | None, as_csv: bool, as_json: bool) -> None:
    """Who used what: requests, tokens, refusals and errors per client, model, tier
    and day, from the gateway's usage ledger."""
    data = fetch_usage(url, {"from": first or "", "to": last or "", "by": by,
                             "client": client or ""}, key)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    elif as_csv:
        write_csv(data, sys.stdout)
    else:
        # Piped, rich would assume 80 columns and squeeze the figures.
        Console(width=None if sys.stdout.isatty() else 200).print(usage_table(data))
