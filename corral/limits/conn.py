"""nginx ``limit_conn`` semantics (ngx_http_limit_conn_module.c), pure.

Counts requests in flight per key. A request is refused by the first zone whose
count has reached its limit, and then it is counted nowhere: nginx increments
zone by zone and undoes the earlier increments on rejection, which is the same as
checking every zone first and incrementing all of them only if all pass, the form
a store can do in one atomic step.

Holders and leases. A count that is only ever incremented and decremented leaks
forever when the process holding it dies before its decrement, which matters once
several replicas share Redis. So a count is the number of live *holders*: each
admitted request is one holder id with a lease expiry; the holder refreshes the
lease while the request runs and removes itself on release, and a lapsed lease
drops out of the count by itself. Both stores implement leases, so a caller that
forgets to refresh fails the same way in memory as on Redis.

Keys: nginx does not count a request whose key is empty or longer than 255 bytes;
callers drop such zones before building a :class:`ConnCall`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from corral.limits.status import LimitStatus, rejected_status

MAX_CONN_LIMIT: Final = 65535
MAX_KEY_BYTES: Final = 255


def accountable_key(key: str) -> bool:
    """Whether nginx would count a request under this key at all."""
    return 0 < len(key.encode()) <= MAX_KEY_BYTES


@dataclass(frozen=True, slots=True)
class ConnCall:
    """One ``limit_conn`` zone applied to one request."""

    zone: str
    key: str
    limit: int

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_CONN_LIMIT:
            raise ValueError(f"zone {self.zone!r}: limit must be 1..{MAX_CONN_LIMIT}")
        if not accountable_key(self.key):
            raise ValueError(
                f"zone {self.zone!r}: key must be 1..{MAX_KEY_BYTES} bytes; nginx does not "
                "count an empty or oversized key, so drop the zone instead"
            )


@dataclass(frozen=True, slots=True)
class ConnLease:
    """What an admitted request holds: refresh it while running, release it at the end."""

    holder: str
    calls: tuple[ConnCall, ...]


@dataclass(frozen=True, slots=True)
class ConnDecision:
    """``counts`` are per zone: after this request when it passed, as found when refused.

    ``lease`` is None when the request is counted nowhere (refused, refused in dry
    run, or no zone applied), and then there is nothing to release.
    """

    status: LimitStatus
    zone_index: int | None = None
    counts: tuple[int, ...] = ()
    lease: ConnLease | None = None

    @property
    def rejected(self) -> bool:
        return self.status is LimitStatus.REJECTED


def acquire(counts: Sequence[int], limits: Sequence[int], *, dry_run: bool = False) -> ConnDecision:
    """Judge one request given each zone's current count; ``counts`` of the result are new."""
    for index, (count, limit) in enumerate(zip(counts, limits, strict=True)):
        if count >= limit:
            return ConnDecision(rejected_status(dry_run), index, tuple(counts))
    return ConnDecision(LimitStatus.PASSED, None, tuple(count + 1 for count in counts))


def live_holders(holders: Mapping[str, int], now_ms: int) -> dict[str, int]:
    """Holders whose lease has not lapsed; a lease expiring at ``now_ms`` has lapsed."""
    return {holder: expiry for holder, expiry in holders.items() if expiry > now_ms}


def release(holders: Mapping[str, int], holder: str) -> dict[str, int] | None:
    """The key's holders after ``holder`` leaves; None when none is left (delete the key).

    Releasing an unknown or lapsed holder changes nothing, so a release that races
    with lease expiry, or is retried, can never take someone else's slot.
    """
    rest = {other: expiry for other, expiry in holders.items() if other != holder}
    return rest or None
