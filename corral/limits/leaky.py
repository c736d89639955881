"""nginx ``limit_req`` arithmetic, reproduced exactly (ngx_http_limit_req_module.c).

Pure: no I/O and no clock; ``now_ms`` is always a parameter, so the in-memory
store, the Redis Lua script (``storage/limit_req.lua``, which mirrors this file
step for step) and the tests all drive it from their own clock.

Units follow nginx: rates, burst, delay and excess are integer *milli-requests*
(1000 = one request) and times are integer milliseconds. Integer truncation is
deliberate: it is why ``10r/m`` spaces requests 6.025 s apart, not 6 s.

Keys: nginx does not account a request whose key is empty or longer than 65535
bytes. Callers drop such zones before building a :class:`ReqZoneCall`
(see :func:`accountable_key`); the call refuses them so a forgotten filter is loud.

Dry run (``limit_req_dry_run on``): pass ``dry_run=True``; state is updated
exactly as in real mode, but the decision never rejects and never delays, and
its status says what would have happened.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from corral.limits.status import LimitStatus, rejected_status

NGX_MAX_INT_T_VALUE: Final = 2**63 - 1
# nginx stores `nodelay` as delay = NGX_MAX_INT_T_VALUE / 1000, then multiplies by
# 1000 like any delay; an excess can never exceed it, so nothing is ever delayed.
NODELAY: Final = NGX_MAX_INT_T_VALUE // 1000 * 1000
MAX_KEY_BYTES: Final = 65535
# A clock more than this far behind a node's `last` is treated as a wrap, not a skew.
_BACKWARD_WRAP_MS: Final = -60000

_RATE_RE: Final = re.compile(r"([0-9]+)(r/s|r/m)?")


def parse_rate(text: str) -> int:
    """``"10r/s"`` → 10000, ``"10r/m"`` → 166 (milli-requests per second).

    No suffix means r/s, as in nginx. The division for r/m truncates, as in nginx.
    """
    match = _RATE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid rate {text!r}: expected Nr/s or Nr/m, e.g. 10r/s or 30r/m")
    count = int(match.group(1))
    if count <= 0:
        raise ValueError(f"invalid rate {text!r}: the rate must be greater than 0")
    scale = 60 if match.group(2) == "r/m" else 1
    return count * 1000 // scale


def accountable_key(key: str) -> bool:
    """Whether nginx would account a request under this key at all."""
    return 0 < len(key.encode()) <= MAX_KEY_BYTES


@dataclass(frozen=True, slots=True)
class ReqZoneParams:
    """One ``limit_req`` line: the zone's rate plus the line's burst and delay.

    All three are milli-requests. ``delay=NODELAY`` is ``nodelay``; any delay of at
    least ``burst`` behaves the same, because an accepted excess never exceeds burst.
    """

    rate: int
    burst: int = 0
    delay: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0 milli-requests per second, got {self.rate}")
        if self.burst < 0:
            raise ValueError(f"burst must be >= 0, got {self.burst}")
        if self.delay < 0:
            raise ValueError(f"delay must be >= 0, got {self.delay}")

    @classmethod
    def from_config(
        cls, rate: str, *, burst: int = 0, delay: int | None = None, nodelay: bool = False
    ) -> ReqZoneParams:
        """Build from the configuration's words: burst and delay in whole requests."""
        if nodelay and delay is not None:
            raise ValueError("give either delay or nodelay, not both")
        milli_delay = NODELAY if nodelay else (delay or 0) * 1000
        return cls(rate=parse_rate(rate), burst=burst * 1000, delay=milli_delay)


@dataclass(frozen=True, slots=True)
class Node:
    """Per-key state: excess in milli-requests, time of the last charge in ms."""

    excess: int
    last_ms: int


@dataclass(frozen=True, slots=True)
class ReqZoneCall:
    """One zone applied to one request: which zone, under which key, with which line."""

    zone: str
    key: str
    params: ReqZoneParams

    def __post_init__(self) -> None:
        if not accountable_key(self.key):
            raise ValueError(
                f"zone {self.zone!r}: key must be 1..{MAX_KEY_BYTES} bytes; nginx does not "
                "account an empty or oversized key, so drop the zone instead"
            )


@dataclass(frozen=True, slots=True)
class ReqDecision:
    """The outcome of one request against all of its zones.

    ``excess`` holds, per zone, the excess this request was judged at (including
    its own 1000); the HTTP layer derives ``RateLimit-Remaining`` from it
    (:func:`remaining`). ``nodes`` is the state to commit, empty when a zone was
    busy: a rejected request charges no zone. ``delay_ms`` is how long the caller
    must hold the request (0 in dry run). ``retry_after_ms`` is set when a zone was
    busy: the wait until the same request would be accepted.
    """

    status: LimitStatus
    delay_ms: int = 0
    zone_index: int | None = None
    excess: tuple[int, ...] = ()
    nodes: tuple[Node, ...] = ()
    retry_after_ms: int = 0

    @property
    def rejected(self) -> bool:
        return self.status is LimitStatus.REJECTED


def decay(node: Node, rate: int, now_ms: int) -> tuple[int, int]:
    """nginx's decay: ``(excess including this request, clamped ms)``.

    A clock slightly behind ``last`` (up to 60 s) counts as no time passed; further
    behind is taken as a wrapped clock and counts as 1 ms.
    """
    ms = now_ms - node.last_ms
    if ms < _BACKWARD_WRAP_MS:
        ms = 1
    elif ms < 0:
        ms = 0
    return max(node.excess - rate * ms // 1000 + 1000, 0), ms


def zone_delay_ms(params: ReqZoneParams, excess: int) -> int:
    if excess <= params.delay:
        return 0
    return (excess - params.delay) * 1000 // params.rate


def zone_retry_after_ms(params: ReqZoneParams, node: Node | None, now_ms: int) -> int:
    """How long until this zone would accept the request (0 if it does now)."""
    if node is None:
        return 0  # a new key starts at excess 0
    excess, _ = decay(node, params.rate, now_ms)
    if excess <= params.burst and now_ms - node.last_ms >= _BACKWARD_WRAP_MS:
        # Past the wrap regime the excess only falls as time passes: accepted now,
        # accepted later.
        return 0
    # Accepted once rate*ms//1000 >= excess + 1000 - burst with ms counted from
    # `last`; before `last` (clock behind) nothing decays.
    need = node.excess + 1000 - params.burst
    ms_needed = 0 if need <= 0 else -(-need * 1000 // params.rate)
    return max(node.last_ms + ms_needed - now_ms, 0)


def retry_after_ms(zones: Sequence[tuple[ReqZoneParams, Node | None]], now_ms: int) -> int:
    """Until the same request would pass every zone; the HTTP layer rounds up to seconds.

    A rejected request changes no state, so each zone can be solved on its own and
    the answer is the latest of them.
    """
    return max((zone_retry_after_ms(p, n, now_ms) for p, n in zones), default=0)


def decide(
    *,
    busy_index: int | None,
    max_delay_ms: int,
    excess: Sequence[int],
    nodes: Sequence[Node],
    retry_after: int,
    dry_run: bool,
) -> ReqDecision:
    """Turn the raw outcome (from Python or from the Lua script) into a decision."""
    if busy_index is not None:
        return ReqDecision(
            status=rejected_status(dry_run),
            zone_index=busy_index,
            excess=tuple(excess),
            retry_after_ms=retry_after,
        )
    if max_delay_ms == 0:
        status = LimitStatus.PASSED
    else:
        status = LimitStatus.DELAYED_DRY_RUN if dry_run else LimitStatus.DELAYED
    return ReqDecision(
        status=status,
        delay_ms=0 if dry_run else max_delay_ms,
        excess=tuple(excess),
        nodes=tuple(nodes),
    )


def evaluate(
    zones: Sequence[tuple[ReqZoneParams, Node | None]], now_ms: int, *, dry_run: bool = False
) -> ReqDecision:
    """Judge one request against all of its zones, in configuration order.

    ``None`` as a node means the key has no state yet. nginx visits zones one by
    one, pins the nodes of earlier zones and commits them only once the last zone
    has passed; judging every zone first and committing all-or-nothing is the same
    thing, which is what lets a store do it in one atomic step.
    """
    excess: list[int] = []
    nodes: list[Node] = []
    busy_index: int | None = None
    max_delay = 0
    for index, (params, node) in enumerate(zones):
        if node is None:
            # nginx creates the node with excess 0 and last = now: the first request
            # of a key costs nothing.
            zone_excess, new_node = 0, Node(0, now_ms)
        else:
            zone_excess, ms = decay(node, params.rate, now_ms)
            # `last` moves only when time was seen to pass: pulling it back to a
            # lagging clock would count the lag again later as elapsed time, credit
            # that was never earned.
            new_node = Node(zone_excess, now_ms if ms else node.last_ms)
        excess.append(zone_excess)
        nodes.append(new_node)
        if busy_index is None and zone_excess > params.burst:
            busy_index = index
        max_delay = max(max_delay, zone_delay_ms(params, zone_excess))
    return decide(
        busy_index=busy_index,
        max_delay_ms=max_delay,
        excess=excess,
        nodes=nodes,
        retry_after=retry_after_ms(zones, now_ms) if busy_index is not None else 0,
        dry_run=dry_run,
    )


def expires_at_ms(params: ReqZoneParams, node: Node) -> int:
    """When a stored node becomes indistinguishable from a missing one.

    From then on decay yields excess 0 and moves `last` to now, exactly what a new
    key gets, so a store may drop the node without any observable change (nginx's
    LRU eviction is faithful for the same reason, except at 1r/m; this bound is
    exact at every rate).
    """
    return node.last_ms + -(-(node.excess + 1000) * 1000 // params.rate)


def remaining(params: ReqZoneParams, excess: int) -> int:
    """Whole requests still accepted right now: for ``RateLimit-Remaining``."""
    return max(params.burst - excess, 0) // 1000


def reset_ms(params: ReqZoneParams, excess: int) -> int:
    """Until the zone's excess has fully drained: for ``RateLimit-Reset``."""
    return -(-excess * 1000 // params.rate)
