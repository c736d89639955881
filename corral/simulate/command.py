"""``corral simulate``: run one or more stand-in Ollama servers until signalled."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
from collections.abc import Callable

import click

from corral.simulate.config import FAULT_MODES, SimConfig
from corral.simulate.durations import parse_keep_alive_setting
from corral.simulate.server import RunningSim, start_sim

_DEFAULTS = SimConfig()


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _keep_alive(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_keep_alive_setting(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


async def _serve(configs: list[SimConfig]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sims: list[RunningSim] = []
    try:
        for cfg in configs:
            sim = await start_sim(cfg)
            sims.append(sim)
            # Tests and scripts wait for this exact line before connecting.
            print(f"simulated ollama listening on {sim.url}", flush=True)
        await stop.wait()
    finally:
        for sim in sims:
            await sim.stop()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@click.command("simulate")
@click.option("--host", default=_DEFAULTS.host, show_default=True, help="Address to listen on.")
@click.option("--port", "ports", type=int, multiple=True,
              help="Port to listen on; repeat for several servers (default 11434, 0 = any free).")
@click.option("--models", default=",".join(_DEFAULTS.models), show_default=True,
              help="Installed models, comma-separated.")
@click.option("--loaded", default="", help="Models loaded at start, comma-separated.")
@click.option("--parallel", type=click.IntRange(min=1), default=_DEFAULTS.parallel,
              show_default=True, help="Slots per loaded model (OLLAMA_NUM_PARALLEL).")
@click.option("--tps", type=click.FloatRange(min=0), default=_DEFAULTS.tokens_per_second,
              show_default=True, help="Generated tokens per second; 0 = instant.")
@click.option("--prompt-tps", type=click.FloatRange(min=0),
              default=_DEFAULTS.prompt_tokens_per_second, show_default=True,
              help="Prompt tokens processed per second; 0 = instant.")
@click.option("--load-time", type=click.FloatRange(min=0), default=_DEFAULTS.load_time,
              show_default=True, help="Seconds to load a model.")
@click.option("--max-loaded", type=click.IntRange(min=1), default=_DEFAULTS.max_loaded_models,
              show_default=True, help="Loaded models before evicting (OLLAMA_MAX_LOADED_MODELS).")
@click.option("--max-queue", type=click.IntRange(min=0), default=_DEFAULTS.max_queue,
              show_default=True, help="Requests waiting for a load before 503 (OLLAMA_MAX_QUEUE).")
@click.option("--num-predict", type=click.IntRange(min=0), default=_DEFAULTS.default_num_predict,
              show_default=True, help="Tokens generated when a request sets no limit.")
@click.option("--keep-alive", callback=_keep_alive, default=None,
              help="Default keep_alive: seconds or a duration like 5m (OLLAMA_KEEP_ALIVE).")
@click.option("--fault", type=click.Choice(FAULT_MODES), default="none", show_default=True,
              help="Misbehaviour to simulate (refuse keeps listening but drops every request).")
@click.option("--drop-after", type=click.IntRange(min=0), default=_DEFAULTS.drop_after,
              show_default=True, help="With --fault drop: chunks sent before the cut.")
@click.option("--instant", is_flag=True, help="No delays at all: --tps 0 --prompt-tps 0 "
              "--load-time 0.")
def simulate_command(
    host: str, ports: tuple[int, ...], models: str, loaded: str, parallel: int, tps: float,
    prompt_tps: float, load_time: float, max_loaded: int, max_queue: int, num_predict: int,
    keep_alive: float | None, fault: str, drop_after: int, instant: bool,
) -> None:
    """Run stand-in Ollama servers (for tests, demos and benchmarks)."""
    if instant:
        tps = prompt_tps = load_time = 0.0
    base = SimConfig(
        host=host,
        models=_names(models),
        loaded=_names(loaded),
        parallel=parallel,
        tokens_per_second=tps,
        prompt_tokens_per_second=prompt_tps,
        load_time=load_time,
        max_loaded_models=max_loaded,
        max_queue=max_queue,
        default_num_predict=num_predict,
        fault=fault,
        drop_after=drop_after,
        keep_alive=_DEFAULTS.keep_alive if keep_alive is None else keep_alive,
    )
    configs = [dataclasses.replace(base, port=p) for p in ports or (_DEFAULTS.port,)]
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(configs))
    except OSError as exc:
        raise click.ClickException(f"cannot listen: {exc}") from None
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        sys.exit(130)
