"""``corral bench chaos``: several replicas on one Redis under steady load, one fault
every few seconds, measured at the backend and at the clients.

The fleet: one ``redis-server`` (no persistence), ``replicas`` Corral processes on it
(Corral's default configuration, except the state URL, the backend, its slots and a
short ``queue.slot_lease`` so that a pause past the lease fits in the run), and one
stand-in Ollama server with ``slots`` slots. ``clients`` clients each send one
streaming request after another, each to a replica picked at random, each try with its
own run id (the stand-in's ``X-Sim-Run-Id``) so that the stand-in can tell a request
it ran twice.

The faults, in turn, one every ``fault_every`` seconds (and at least ``calm`` seconds
after the previous one healed), in whole rounds of the four kinds:

- ``redis restarted`` — SIGKILL to redis-server, and a new one at once on the same
  port: every key is gone;
- ``redis paused`` — SIGSTOP to redis-server for ``redis_pause`` seconds (past the
  slot store's socket timeout), then SIGCONT;
- ``replica paused`` — SIGSTOP to one replica for ``replica_pause`` seconds (past its
  slot lease), then SIGCONT;
- ``replica killed`` — SIGKILL to one replica, restarted at once on the same port (as
  a supervisor would).

What a client's try ends as:

- ``answered`` — 200 and a complete stream (a last line with ``"done": true``, no
  error line);
- ``refused`` — 503 with ``Retry-After``: the gateway said no and when to come back;
  the client waits that long and sends the request again (to another replica);
- ``rerouted`` — the connection was refused before anything was sent (the replica
  is down): a load balancer sends it to another replica, so the client does;
- ``cut by a replica's death`` — the replica was killed while the try was open (or
  was being killed when it began) and it got no complete answer: that is the
  replica's death, not the protocol's; a load balancer would send it again, so the
  client does (with a new run id);
- ``lost`` — anything else: another status, a 503 without ``Retry-After``, an
  incomplete or error stream, a reset or a silence past ``request_deadline`` from a
  replica that was not killed.

A request is lost when one of its tries is (the goal: none). Measured at the stand-in:
the most requests open there at once, and every stretch with more open than its slots;
a stretch that began while a replica was paused, or within a lease after it resumed,
and that holds a request sent through that replica is the documented case (a replica
paused longer than its lease, whose lease lapsed under a request it had granted) and
is counted apart. Served rate:
answers per second in the ``window`` seconds after the last fault healed against the
``window`` seconds before the first fault.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from corral.bench import harness, load
from corral.bench.harness import MODEL, Target
from corral.simulate.config import RUN_ID_HEADER

Progress = Callable[[str], None]

REDIS_RESTARTED = "redis restarted"
REDIS_PAUSED = "redis paused"
REPLICA_PAUSED = "replica paused"
REPLICA_KILLED = "replica killed"
KINDS = (REDIS_RESTARTED, REDIS_PAUSED, REPLICA_PAUSED, REPLICA_KILLED)

# Corral's queue.max_wait when the configuration leaves it out.
DEFAULT_MAX_WAIT = 120.0

ANSWERED, REFUSED, REROUTED, CUT, LOST = (
    "answered", "refused", "rerouted", "cut by a replica's death", "lost")


@dataclass(frozen=True)
class Options:
    duration: float = 600.0       # seconds of faults (rounded up to whole rounds)
    fault_every: float = 5.0
    clients: int = 8
    replicas: int = 3
    slots: int = 2
    num_predict: int = 10
    tps: float = 50.0             # 10 tokens at 50 tokens/s: 0.2 s a request
    # The smallest lease Corral accepts (three renewals of one second), so that a
    # pause past it takes seconds.
    slot_lease: float = 3.0
    redis_pause: float = 2.5      # the slot store's socket timeout is 1 s
    replica_pause: float = 5.0    # past the lease
    window: float = 8.0
    # At least this long between a fault's healing and the next fault.
    calm: float = 2.0
    warmup: float = 3.0
    # Longer than Corral's default queue.max_wait (120 s): a request that waits that
    # long ends as a 503 with Retry-After, not as a silence.
    request_deadline: float = 150.0
    # queue.max_wait for the replicas; None leaves Corral's default.
    max_wait: float | None = None

    def __post_init__(self) -> None:
        if self.replica_pause <= self.slot_lease:
            raise ValueError("replica_pause must be longer than slot_lease")


@dataclass
class Try:
    """One request sent once to one replica."""

    client: int
    replica: int
    run_id: str
    start: float                  # wall clock, comparable with the stand-in's
    end: float = 0.0
    outcome: str = ""
    detail: str = ""


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    healed: float = 0.0
    # For a paused replica: its index (run ids sent through it start with r<index>.).
    replica: int | None = None


# -- the processes -------------------------------------------------------------------


class Redis:
    """A redis-server without persistence on a fixed port, so that it can be killed
    and started again where the replicas look for it."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = harness.free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise harness.TargetError("redis-server is not installed")
        self.starts += 1
        log = self.workdir / f"redis-{self.starts}.log"
        with log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.returncode is not None:
                raise harness.TargetError(f"redis-server exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise harness.TargetError(f"redis-server not ready: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.02)

    async def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.signal(signal.SIGCONT)
            await self.kill()


@dataclass
class Replica:
    index: int
    port: int
    config: Path
    target: Target | None = None
    # Bumped at each kill: a try that saw another generation at its end was open when
    # its replica died.
    generation: int = 0
    # From the kill until its successor is ready: a connection it accepted meanwhile
    # (the kernel completes handshakes until the process is gone) is reset.
    down: bool = False
    started: int = 0
    exits: list[int] = field(default_factory=list)   # unexpected exit statuses


def replica_config(port: int, redis_url: str, backend: Target, opts: Options) -> dict[str, Any]:
    """Corral's defaults, except what the scenario needs."""
    queue: dict[str, Any] = {"slot_lease": f"{opts.slot_lease:g}s"}
    if opts.max_wait is not None:
        queue["max_wait"] = f"{opts.max_wait:g}s"
    return {
        "listen": f"127.0.0.1:{port}",
        "state": redis_url,
        "backends": [{"url": backend.url, "name": "b0", "max_concurrency": opts.slots}],
        "queue": queue,
    }


class Fleet:
    def __init__(self, workdir: Path, stack: contextlib.AsyncExitStack, opts: Options) -> None:
        self.workdir = workdir
        self.stack = stack
        self.opts = opts
        self.redis = Redis(workdir)
        self.standin: Target | None = None
        self.replicas: list[Replica] = []

    async def start(self) -> None:
        self.stack.push_async_callback(self.redis.stop)
        await self.redis.start()
        self.standin = await self.stack.enter_async_context(harness.simulator(
            self.workdir, parallel=self.opts.slots, tps=self.opts.tps))
        for i in range(self.opts.replicas):
            port = harness.free_port()
            path = self.workdir / f"corral-{i}.yaml"
            path.write_text(yaml.safe_dump(
                replica_config(port, self.redis.url, self.standin, self.opts),
                sort_keys=False))
            self.replicas.append(Replica(i, port, path))
        self.stack.callback(self._resume_all)
        await asyncio.gather(*(self.start_replica(r) for r in self.replicas))

    async def start_replica(self, r: Replica) -> None:
        r.started += 1
        argv = [sys.executable, "-m", "corral.cli", "serve", "--config", str(r.config),
                "--log-level", "warning"]
        r.target = await self.stack.enter_async_context(
            harness.spawn(f"corral-{r.index}.{r.started}", argv, r.port, self.workdir))

    def _resume_all(self) -> None:
        # A run stopped mid-pause must not leave a stopped process behind: SIGTERM
        # would wait on it.
        for r in self.replicas:
            if r.target is not None and r.target.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    r.target.proc.send_signal(signal.SIGCONT)

    async def restart_exited(self, events: list[dict[str, Any]], origin: float) -> None:
        """A replica that died on its own is a finding; a supervisor restarts it."""
        for r in self.replicas:
            assert r.target is not None
            code = r.target.proc.returncode
            if code is not None:
                r.exits.append(code)
                r.generation += 1
                r.down = True
                events.append({"at_s": round(time.time() - origin, 3),
                               "event": f"replica {r.index} exited on its own ({code})"})
                await self.start_replica(r)
                r.down = False


# -- the clients -----------------------------------------------------------------------


def _complete(body: bytes) -> bool:
    lines = [line for line in body.split(b"\n") if line.strip()]
    if not lines or any(b'"error"' in line for line in lines):
        return False
    try:
        last = orjson.loads(lines[-1])
    except orjson.JSONDecodeError:
        return False
    return isinstance(last, dict) and last.get("done") is True


class Clients:
    def __init__(self, fleet: Fleet, opts: Options) -> None:
        self.fleet = fleet
        self.opts = opts
        self.tries: list[Try] = []
        self._opened: dict[int, Try] = {}    # the tries not ended yet, by id()
        self.requests = 0          # logical requests finished (answered or lost)
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._body = orjson.dumps({"model": MODEL, "prompt": "hi", "stream": True,
                                   "options": {"num_predict": opts.num_predict}})

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._client(i)) for i in range(self.opts.clients)]

    async def stop(self) -> None:
        """No new requests; the open ones end (each within its deadline). A try still
        open after that never got an answer: it is lost, not forgotten."""
        self._stopping = True
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*self._tasks),
                                       self.opts.request_deadline + 10)
        finally:
            self.cancel()
            for t in self._opened.values():
                t.end, t.outcome, t.detail = time.time(), LOST, "still open at the end"
                self.tries.append(t)
                self.requests += 1
            self._opened.clear()

    def cancel(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()

    async def _client(self, index: int) -> None:
        replicas = self.fleet.replicas
        conns: dict[int, tuple[load.Connection, int]] = {}
        # A replica at random for each try, as a load balancer's random policy: in
        # strict turns, a paused replica gathers every client and lets them go in
        # step, so that the next fault would find them all on the same replica.
        rng = random.Random(index)
        seq = 0
        try:
            while not self._stopping:
                # One request: tries until it is answered or lost; a try sent again
                # goes to another replica than the one that did not take it.
                misses = 0
                previous: int | None = None
                while True:
                    choices = [x for x in range(len(replicas)) if x != previous]
                    r = replicas[rng.choice(choices)]
                    previous = r.index
                    seq += 1
                    t = await self._try(index, r, f"r{r.index}.c{index}.{seq}", conns)
                    self.tries.append(t)
                    if t.outcome in (ANSWERED, LOST):
                        self.requests += 1
                        break
                    if t.outcome == REFUSED:
                        await asyncio.sleep(float(t.detail))
                    elif t.outcome == REROUTED:
                        misses += 1
                        if misses >= len(replicas):
                            # Every replica refused the connection: do not spin.
                            await asyncio.sleep(0.1)
                            misses = 0
                    if self._stopping:
                        break
        finally:
            for conn, _ in conns.values():
                conn.close()

    async def _try(self, client: int, r: Replica, run_id: str,
                   conns: dict[int, tuple[load.Connection, int]]) -> Try:
        t = Try(client, r.index, run_id, time.time())
        self._opened[id(t)] = t
        # Not popped when cancelled: stop() cancels the tries still open at its
        # deadline, and counts them.
        await self._send(t, r, conns)
        del self._opened[id(t)]
        return t

    async def _send(self, t: Try, r: Replica,
                    conns: dict[int, tuple[load.Connection, int]]) -> None:
        run_id = t.run_id
        generation = r.generation
        dying = r.down

        def died() -> bool:
            return dying or r.down or r.generation != generation
        held = conns.get(r.index)
        if held is not None and held[1] != generation:
            # Its replica was killed since: a load balancer's pool drops such
            # connections; sending on one would look like a cut.
            held[0].close()
            held = None
        if held is None:
            conn = load.Connection("127.0.0.1", r.port)
            try:
                await asyncio.wait_for(conn.connect(), 5.0)
            except (OSError, TimeoutError) as exc:
                conn.close()
                t.end, t.outcome, t.detail = time.time(), REROUTED, type(exc).__name__
                return
            held = conns[r.index] = (conn, generation)
        conn = held[0]
        request = load.encode_request("127.0.0.1", r.port, "POST", "/api/generate",
                                      self._body)
        # The run id travels as a header: Corral passes the client's headers on.
        request = request.replace(b"\r\n\r\n", f"\r\n{RUN_ID_HEADER}: {run_id}\r\n\r\n".encode(),
                                  1)
        try:
            resp = await asyncio.wait_for(conn.exchange(request, collect=True),
                                          self.opts.request_deadline)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, load.ProtocolError) as exc:
            conn.close()
            conns.pop(r.index, None)
            t.end = time.time()
            t.outcome = CUT if died() else LOST
            t.detail = type(exc).__name__
            return
        t.end = time.time()
        if resp.status == 200 and _complete(resp.body):
            t.outcome = ANSWERED
        elif died():
            t.outcome, t.detail = CUT, f"{resp.status} incomplete"
        elif resp.status == 503 and resp.retry_after is not None:
            t.outcome = REFUSED
            try:
                t.detail = f"{max(0.0, float(resp.retry_after)):g}"
            except ValueError:
                t.outcome, t.detail = LOST, f"503 Retry-After {resp.retry_after!r}"
        else:
            t.outcome = LOST
            t.detail = (f"{resp.status} {resp.body[:160].decode(errors='replace')}"
                        if resp.status != 200 else "200 incomplete")


# -- the stand-in ------------------------------------------------------------------------


async def standin_stats(standin: Target) -> dict[str, Any]:
    conn = load.Connection(standin.host, standin.port)
    try:
        resp = await asyncio.wait_for(conn.exchange(load.encode_request(
            standin.host, standin.port, "GET", "/_sim/stats"), collect=True), 10.0)
    finally:
        conn.close()
    return dict(orjson.loads(resp.body))


# -- the faults --------------------------------------------------------------------------


async def inflict(fleet: Fleet, kind: str, count: int, opts: Options) -> Fault:
    """One fault, until it healed."""
    if kind == REDIS_RESTARTED:
        f = Fault(kind, "redis", time.time())
        await fleet.redis.kill()
        await fleet.redis.start()
    elif kind == REDIS_PAUSED:
        f = Fault(kind, "redis", time.time())
        fleet.redis.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(opts.redis_pause)
        finally:
            fleet.redis.signal(signal.SIGCONT)
    else:
        r = fleet.replicas[count % len(fleet.replicas)]
        assert r.target is not None
        proc = r.target.proc
        f = Fault(kind, f"replica {r.index}", time.time(), replica=r.index)
        if kind == REPLICA_PAUSED:
            proc.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(opts.replica_pause)
            finally:
                proc.send_signal(signal.SIGCONT)
        else:
            # The generation first: a try that ends from now on was cut by this death.
            r.generation += 1
            r.down = True
            proc.kill()
            await proc.wait()
            await fleet.start_replica(r)
            r.down = False
    f.healed = time.time()
    return f


def fault_count(opts: Options) -> int:
    """Faults in the run: one every ``fault_every`` over ``duration``, rounded up to
    whole rounds of the four kinds, so that each comes as often as the others and the
    last one is always a replica killed (the served rate after it is measured after
    the same fault from one run to the next)."""
    wanted = math.floor(opts.duration / opts.fault_every) + 1
    return math.ceil(wanted / len(KINDS)) * len(KINDS)


async def _until(at: float) -> None:
    await asyncio.sleep(max(0.0, at - time.time()))


# -- the run -----------------------------------------------------------------------------


async def sample_busy(standin: Target, samples: list[tuple[float, float]],
                      interval: float = 0.5) -> None:
    """The stand-in's busy slot-seconds, every ``interval``, until cancelled: how busy
    its slots were over any stretch of the run (a backend running with a slot lost
    shows as half busy under a load that would fill both)."""
    while True:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError,
                                 load.ProtocolError, orjson.JSONDecodeError):
            samples.append((time.time(), float(
                (await standin_stats(standin))["busy_seconds"])))
        await asyncio.sleep(interval)


async def run(opts: Options, workdir: Path, progress: Progress) -> dict[str, Any]:
    harness.raise_fd_limit()
    faults: list[Fault] = []
    events: list[dict[str, Any]] = []
    busy: list[tuple[float, float]] = []
    async with contextlib.AsyncExitStack() as stack:
        progress(f"starting redis-server, a stand-in with {opts.slots} slots and "
                 f"{opts.replicas} Corral replicas")
        fleet = Fleet(workdir, stack, opts)
        await fleet.start()
        assert fleet.standin is not None
        clients = Clients(fleet, opts)
        clients.start()
        sampler = asyncio.ensure_future(sample_busy(fleet.standin, busy))
        origin = time.time()
        try:
            progress(f"{opts.clients} clients: {opts.warmup:g} s warm-up, then "
                     f"{opts.window:g} s before the first fault")
            first = origin + opts.warmup + opts.window
            count = fault_count(opts)
            per_kind: Counter[str] = Counter()
            for i in range(count):
                # Some calm after each fault, however long it took: whether the
                # capacity came back after it is measured there.
                calm = faults[-1].healed + opts.calm if faults else 0.0
                await _until(max(first + i * opts.fault_every, calm))
                kind = KINDS[i % len(KINDS)]
                f = await inflict(fleet, kind, per_kind[kind], opts)
                per_kind[kind] += 1
                faults.append(f)
                progress(f"fault {i + 1}/{count}: {kind} ({f.target}), healed after "
                         f"{f.healed - f.start:.1f} s")
                fleet.standin.check_alive()
                await fleet.restart_exited(events, origin)
            progress(f"{opts.window:g} s after the last fault")
            await _until(faults[-1].healed + opts.window + 0.6)   # one sample past it
            progress("waiting for the requests still open")
            await clients.stop()
            stats = await standin_stats(fleet.standin)
        finally:
            clients.cancel()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
    return summarize(opts, origin, faults, clients, stats, busy, events, fleet)


def busy_share(samples: list[tuple[float, float]], a: float, b: float, slots: int) -> float | None:
    """The share of the slots' time busy between ``a`` and ``b`` (interpolated between
    samples); None without samples on both sides."""
    def at(t: float) -> float | None:
        i = bisect.bisect_left(samples, t, key=lambda x: x[0])
        if i == len(samples) or (i == 0 and samples[0][0] != t):
            return None
        t1, v1 = samples[i]
        if t1 == t:
            return v1
        t0, v0 = samples[i - 1]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)

    lo, hi = at(a), at(b)
    if lo is None or hi is None or b <= a:
        return None
    return round((hi - lo) / ((b - a) * slots), 3)


def _attribute(episodes: list[dict[str, Any]], faults: list[Fault], origin: float,
               lease: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split the stand-in's over-slot stretches into the documented case (begun while
    a replica was paused or within a lease after it resumed, holding a request sent
    through it) and the others."""
    documented, other = [], []
    for e in episodes:
        row = {"at_s": round(e["start"] - origin, 3),
               "seconds": None if e["end"] is None else round(e["end"] - e["start"], 3),
               "peak": e["peak"], "ids": e["ids"]}
        # Until a lease after SIGCONT: the resumed replica may still forward a request
        # granted before the pause, under the lease that lapsed meanwhile.
        paused = [f for f in faults if f.kind == REPLICA_PAUSED
                  and f.start <= e["start"] <= f.healed + lease
                  and any(i.startswith(f"r{f.replica}.") for i in e["ids"])]
        begun = [f for f in faults if f.start <= e["start"]]
        if begun:
            # The fault that came last before it: where to look for the cause.
            row["after"] = f"{begun[-1].kind} ({begun[-1].target})"
            row["since_fault_s"] = round(e["start"] - begun[-1].start, 3)
        if paused:
            row["pause_at_s"] = round(paused[0].start - origin, 3)
            row["after_resume_s"] = (round(e["start"] - paused[0].healed, 3)
                                     if e["start"] > paused[0].healed else None)
            documented.append(row)
        else:
            other.append(row)
    return documented, other


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": _round(load.percentile(values, 50)), "p99": _round(load.percentile(values, 99)),
            "max": _round(max(values, default=float("nan")))}


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


def summarize(opts: Options, origin: float, faults: list[Fault], clients: Clients,
              stats: dict[str, Any], busy: list[tuple[float, float]],
              events: list[dict[str, Any]],
              fleet: Fleet) -> dict[str, Any]:
    tries = clients.tries
    first, last = faults[0].start, faults[-1].healed
    outcomes = Counter(t.outcome for t in tries)
    lost = [t for t in tries if t.outcome == LOST]
    before = sum(1 for t in tries if t.outcome == ANSWERED and first - opts.window <= t.end < first)
    after = sum(1 for t in tries if t.outcome == ANSWERED and last <= t.end < last + opts.window)
    rate_before, rate_after = before / opts.window, after / opts.window
    ratio = rate_after / rate_before if rate_before else None
    documented, other = _attribute(stats.get("over_slots", []), faults, origin,
                                   opts.slot_lease)
    max_outside = max((e["peak"] for e in other), default=min(stats["max_concurrent"],
                                                              opts.slots))
    repeated = stats.get("runs_repeated", {})
    # How busy the slots were between each fault's healing and the next fault (from
    # half a second after healing, so that the fault's own stall is not counted).
    between: dict[str, list[float]] = {k: [] for k in KINDS}
    for i, f in enumerate(faults):
        end = faults[i + 1].start if i + 1 < len(faults) else f.healed + opts.window
        share = busy_share(busy, f.healed + 0.5, end, opts.slots)
        if share is not None:
            between[f.kind].append(share)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind]
        by_kind[kind] = {"count": len(mine),
                         "healed_after_s_max": round(max((f.healed - f.start for f in mine),
                                                         default=0.0), 3),
                         "slots_busy_after": (round(sum(between[kind]) / len(between[kind]),
                                                    3) if between[kind] else None)}
    seconds = math.ceil(last + opts.window - origin)
    answered_per_s = [0] * seconds
    for t in tries:
        second = int(t.end - origin)
        if t.outcome == ANSWERED and 0 <= second < seconds:
            answered_per_s[second] += 1
    # Tries by the fault they ended during (or after, until the next fault began).
    outcome_by_kind: dict[str, Counter[str]] = {k: Counter() for k in KINDS}
    starts = [f.start for f in faults]
    for t in tries:
        k = None
        for i, s in enumerate(starts):
            if t.end >= s:
                k = faults[i].kind
        if k is not None:
            outcome_by_kind[k][t.outcome] += 1
    goals = {
        "max_in_flight": {"measured": max_outside, "goal": opts.slots,
                          "met": max_outside <= opts.slots},
        "lost": {"measured": len(lost), "goal": 0, "met": not lost},
        "run_twice": {"measured": len(repeated), "goal": 0, "met": not repeated},
        "served_ratio": {"measured": None if ratio is None else round(ratio, 3),
                         "goal": 0.9, "met": ratio is not None and ratio >= 0.9},
    }
    return {
        "options": asdict(opts),
        "seconds": round(time.time() - origin, 1),
        "faults": [{"kind": f.kind, "target": f.target, "at_s": round(f.start - origin, 3),
                    "healed_after_s": round(f.healed - f.start, 3)} for f in faults],
        "faults_by_kind": by_kind,
        "events": events,
        "requests": clients.requests,
        "tries": dict(outcomes),
        "tries_by_fault": {k: dict(v) for k, v in outcome_by_kind.items()},
        "seconds_per_try": {
            outcome: _spread([t.end - t.start for t in tries if t.outcome == outcome])
            for outcome in (ANSWERED, REFUSED)},
        # Refused only after waiting the whole queue.max_wait: the answer is proper, but
        # a request that waited that long while others were served is a waiter that
        # no freed slot ever woke.
        "refused_after_max_wait": sum(
            1 for t in tries if t.outcome == REFUSED
            and t.end - t.start >= (opts.max_wait or DEFAULT_MAX_WAIT) - 0.5),
        # The longest waits: a request that waited long with the backend idle is
        # capacity the replicas did not see come back.
        "slowest": [{"at_s": round(t.start - origin, 3), "replica": t.replica,
                     "run_id": t.run_id, "seconds": round(t.end - t.start, 3),
                     "outcome": t.outcome}
                    for t in sorted(tries, key=lambda t: t.start - t.end)[:10]],
        "lost": [{"at_s": round(t.start - origin, 3), "replica": t.replica,
                  "run_id": t.run_id, "seconds": round(t.end - t.start, 3),
                  "detail": t.detail} for t in lost],
        "backend": {
            "max_in_flight": stats["max_concurrent"],
            "max_in_flight_outside_lease_pause": max_outside,
            "over_slots_lease_pause": documented,
            "over_slots_other": other,
            "over_slots_dropped": stats.get("over_slots_dropped", 0),
            "runs_repeated": repeated,
            "run_ids": stats.get("run_ids"),
            "completed": stats.get("completed"),
            "cancelled": stats.get("cancelled"),
        },
        "served": {"before_per_s": round(rate_before, 3), "after_per_s": round(rate_after, 3),
                   "ratio": goals["served_ratio"]["measured"],
                   "slots_busy_before": busy_share(busy, first - opts.window, first,
                                                   opts.slots),
                   "slots_busy_after": busy_share(busy, last, last + opts.window,
                                                  opts.slots)},
        "timeline": {"answered_per_s": answered_per_s,
                     "slots_busy_per_s": [busy_share(busy, origin + n, origin + n + 1,
                                                     opts.slots) for n in range(seconds)]},
        "replica_exits": {str(r.index): r.exits for r in fleet.replicas if r.exits},
        "goals": goals,
        "met": all(g["met"] for g in goals.values()),
    }


# -- the report --------------------------------------------------------------------------


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _verdict(met: bool) -> str:
    return "[green]met[/]" if met else "[red]missed[/]"


def render(console: Console, result: dict[str, Any]) -> None:
    o = result["options"]
    t = Table(title=f"Chaos: {o['replicas']} replicas on one redis-server, a stand-in with "
                    f"{o['slots']} slots, {o['clients']} clients; one fault every "
                    f"{o['fault_every']:g} s for {o['duration']:g} s",
              box=box.SIMPLE_HEAD)
    for col in ("fault", "times", "healed in (max s)", "slots busy after",
                "answered", "refused", "rerouted", "cut by death", "lost"):
        t.add_column(col, justify="left" if col == "fault" else "right")
    for kind, row in result["faults_by_kind"].items():
        c = result["tries_by_fault"][kind]
        t.add_row(kind, str(row["count"]), f"{row['healed_after_s_max']:.1f}",
                  _share(row["slots_busy_after"]),
                  *(str(c.get(k, 0)) for k in (ANSWERED, REFUSED, REROUTED, CUT, LOST)))
    console.print(t)
    console.print("[dim]tries counted under the last fault begun when they ended; slots "
                  "busy after: the stand-in's busy share from half a second after each such "
                  "fault healed to the next fault (mean); refused: 503 with Retry-After "
                  "(sent again after it); rerouted: connection refused, sent to another "
                  "replica[/]")
    g, b, s = result["goals"], result["backend"], result["served"]
    t = Table(title="Goals", box=box.SIMPLE_HEAD)
    for col in ("measure", "measured", "goal", "verdict"):
        t.add_column(col)
    t.add_row("most requests at the backend at once (outside a replica paused past "
              "its lease)", str(g["max_in_flight"]["measured"]),
              f"≤ {g['max_in_flight']['goal']}", _verdict(g["max_in_flight"]["met"]))
    t.add_row("requests with neither an answer nor a 503 with Retry-After",
              str(g["lost"]["measured"]), "0", _verdict(g["lost"]["met"]))
    t.add_row("requests run twice at the backend", str(g["run_twice"]["measured"]), "0",
              _verdict(g["run_twice"]["met"]))
    ratio = g["served_ratio"]["measured"]
    t.add_row(f"served rate, {o['window']:g} s after the last fault / before the first",
              "–" if ratio is None else f"{ratio:.2f} ({s['after_per_s']:.1f} / "
              f"{s['before_per_s']:.1f} per s)", "≥ 0.9", _verdict(g["served_ratio"]["met"]))
    console.print(t)
    console.print(
        f"{result['requests']} requests; at the backend: {b['max_in_flight']} at most at "
        f"once, {len(b['over_slots_other'])} stretch(es) over its slots outside a lease "
        f"pause, {len(b['over_slots_lease_pause'])} in a replica's pause past its lease; "
        f"slots busy {_share(s['slots_busy_before'])} before the first fault, "
        f"{_share(s['slots_busy_after'])} after the last", highlight=False)
    if result["refused_after_max_wait"]:
        console.print(f"[yellow]{result['refused_after_max_wait']} request(s) refused only "
                      "after waiting the whole queue.max_wait[/]")
    spread = result["seconds_per_try"][ANSWERED]
    slowest = result["slowest"][0] if result["slowest"] else None
    if slowest is not None:
        console.print(f"seconds per answered try: p50 {spread['p50']}, p99 {spread['p99']}; "
                      f"the longest try took {slowest['seconds']:.1f} s ({slowest['outcome']}, "
                      f"begun at {slowest['at_s']:.0f} s)", highlight=False)
    kinds = Counter(e.get("after", "?").split(" (")[0] for e in b["over_slots_other"])
    if kinds:
        console.print("over-slot stretches by the fault before them: "
                      + ", ".join(f"{k}: {n}" for k, n in kinds.most_common()),
                      highlight=False)
    if result["replica_exits"]:
        console.print(f"[yellow]replicas that exited on their own (restarted): "
                      f"{result['replica_exits']}[/]")


def markdown(result: dict[str, Any]) -> str:
    """The short summary written next to the JSON."""
    o, g, s, b = result["options"], result["goals"], result["served"], result["backend"]

    def v(met: bool) -> str:
        return "met" if met else "**missed**"

    ratio = g["served_ratio"]["measured"]
    lines = [
        f"# corral bench chaos — {result.get('date', '')}",
        "",
        f"{o['replicas']} replicas on one redis-server, a stand-in with {o['slots']} slots, "
        f"{o['clients']} clients, one fault every {o['fault_every']:g} s for "
        f"{o['duration']:g} s ({len(result['faults'])} faults; slot_lease "
        f"{o['slot_lease']:g} s), {result['requests']} requests.",
        "",
        "| measure | measured | goal | verdict |",
        "|---|---|---|---|",
        f"| most at the backend at once, outside a replica paused past its lease | "
        f"{g['max_in_flight']['measured']} (all: {b['max_in_flight']}) | ≤ {o['slots']} | "
        f"{v(g['max_in_flight']['met'])} |",
        f"| requests with neither an answer nor a 503 with Retry-After | "
        f"{g['lost']['measured']} | 0 | {v(g['lost']['met'])} |",
        f"| requests run twice | {g['run_twice']['measured']} | 0 | "
        f"{v(g['run_twice']['met'])} |",
        f"| served rate after the last fault / before the first | "
        f"{'–' if ratio is None else f'{ratio:.2f}'} ({s['after_per_s']:.1f} / "
        f"{s['before_per_s']:.1f} per s) | ≥ 0.9 | {v(g['served_ratio']['met'])} |",
        "",
        "| fault | times | slots busy after | answered | refused | rerouted | cut by death "
        "| lost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, row in result["faults_by_kind"].items():
        c = result["tries_by_fault"][kind]
        lines.append(f"| {kind} | {row['count']} | {_share(row['slots_busy_after'])} | "
                     + " | ".join(str(c.get(k, 0)) for k in (ANSWERED, REFUSED, REROUTED,
                                                             CUT, LOST)) + " |")
    kinds = Counter(e.get("after", "?").split(" (")[0] for e in b["over_slots_other"])
    lines += ["", f"Over-slot stretches: {len(b['over_slots_other'])} outside a lease "
              f"pause (by the fault before them: "
              f"{', '.join(f'{k} {n}' for k, n in kinds.most_common()) or 'none'}), "
              f"{len(b['over_slots_lease_pause'])} during one. Slots busy "
              f"{_share(s['slots_busy_before'])} before the first fault, "
              f"{_share(s['slots_busy_after'])} after the last."]
    if result["slowest"]:
        slowest = result["slowest"][0]
        spread = result["seconds_per_try"][ANSWERED]
        lines += ["", f"Seconds per answered try: p50 {spread['p50']}, p99 {spread['p99']}; "
                  f"the longest try took {slowest['seconds']:.1f} s ({slowest['outcome']}); "
                  f"{result['refused_after_max_wait']} request(s) refused only after "
                  "waiting the whole queue.max_wait."]
    lines.append("")
    return "\n".join(lines)
