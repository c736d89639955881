"""``corral demo``: two stand-in Ollama backends and a gateway in front of them.

For someone with no Ollama at hand: everything Corral does (slots, queueing,
model-aware routing, streaming) can be seen with curl or any Ollama/OpenAI client.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import click

from corral.config import Settings


def demo_settings(port: int, sim_ports: tuple[int, int], access_log: str) -> Settings:
    return Settings.model_validate({
        "listen": f"127.0.0.1:{port}",
        "backends": [
            {"url": f"http://127.0.0.1:{sim_ports[0]}", "name": "gpu0", "max_concurrency": 2},
            {"url": f"http://127.0.0.1:{sim_ports[1]}", "name": "gpu1", "max_concurrency": 2},
        ],
        "health": {"interval": "2s"},
        # The stand-ins load a model in a second: say so until Corral has measured it.
        "routing": {"load_time": "1s"},
        "queue": {"max_depth": 200, "max_wait": "60s"},
        "access_log": access_log,
        # The demo's ledger lives in the temporary directory, not where it was started.
        "usage": {"path": str(Path(tempfile.gettempdir()) / f"corral-demo-usage-{port}.sqlite3")},
    })


async def run_demo(port: int, tps: float, access_log: str) -> None:
    from corral.app import serve
    from corral.simulate.server import SimConfig, start_sim

    shared = ("llama3.2:latest", "nomic-embed-text:latest")
    sims = [
        await start_sim(SimConfig(port=0, models=(*shared, "qwen2.5:0.5b"),
                                  loaded=("llama3.2:latest",), parallel=2,
                                  tokens_per_second=tps, load_time=1.0)),
        await start_sim(SimConfig(port=0, models=(*shared, "mistral:7b"), parallel=2,
                                  tokens_per_second=tps, load_time=1.0)),
    ]
    settings = demo_settings(port, (sims[0].port, sims[1].port), access_log)

    def ready(url: str) -> None:
        click.echo(f"""
Corral demo running at {url}
  gpu0 (stand-in Ollama on :{sims[0].port}): llama3.2, nomic-embed-text, qwen2.5:0.5b
  gpu1 (stand-in Ollama on :{sims[1].port}): llama3.2, nomic-embed-text, mistral:7b
  each backend has 2 slots; {tps:g} tokens/s

Try:
  curl {url}/api/chat -d '{{"model":"llama3.2","messages":[{{"role":"user","content":"hello"}}]}}'
  curl {url}/api/tags
  curl {url}/corral/status
  curl '{url}/corral/usage?by=client,model'
  dashboard: {url}/dashboard      metrics: {url}/metrics

Press Ctrl-C to stop.""", err=True)

    try:
        await serve(settings, ready)
    finally:
        await asyncio.gather(*(s.stop() for s in sims), return_exceptions=True)


@click.command()
@click.option("--port", default=8080, show_default=True, help="Port of the gateway.")
@click.option("--tps", default=20.0, show_default=True, help="Tokens per second of the stand-ins.")
@click.option("--access-log", default="off", show_default=True,
              help="stdout, stderr, off or a file path.")
def demo_command(port: int, tps: float, access_log: str) -> None:
    """Run a gateway in front of two stand-in Ollama backends."""
    from corral.runtime import run_async, setup_logging

    setup_logging("warning")
    run_async(run_demo(port, tps, access_log))
