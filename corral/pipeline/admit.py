"""Admission: every matching limit rule, with nginx's semantics (REFERENCE A1/A2).

Order, as nginx's phases: ``limit_req`` rules first (a rejected request charges no
zone; the delay is the longest over zones, served here, before the request takes
any backend slot), then token budgets (refused while a budget is spent), then
``limit_conn`` rules (counted until the response ends or the client leaves).

Rule selection: a rule applies when every selector it has matches (``paths``,
``methods``, ``models``, ``tiers``). A zone is applied at most once per request:
the first matching rule of a zone wins, so specific rules go before general ones,
as nginx's most specific ``location`` wins. An empty key is not counted (nginx).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from corral.backends.backend import normalize_model
from corral.config import LimitRule, Settings
from corral.limits.conn import ConnCall, ConnLease
from corral.limits.conn import accountable_key as conn_key_ok
from corral.limits.leaky import ReqZoneCall, ReqZoneParams, accountable_key, remaining, reset_ms
from corral.limits.status import LimitStatus
from corral.limits.storage.base import DEFAULT_CONN_LEASE_MS, LimitStore, StoreError
from corral.limits.tokens import TokenBudget, TokenCall
from corral.pipeline.errors import error_response
from corral.pipeline.identify import Client

log = logging.getLogger("corral.limits")


@dataclass(frozen=True)
class _Rule:
    cfg: LimitRule
    exact: frozenset[str]
    prefixes: tuple[str, ...]
    methods: frozenset[str]
    models: frozenset[str]
    tiers: frozenset[str]
    params: ReqZoneParams | None
    budgets: tuple[tuple[str, TokenBudget], ...]

    @classmethod
    def compile(cls, rule: LimitRule) -> _Rule:
        exact = frozenset(p for p in rule.paths if not p.endswith(("*", "/")))
        prefixes = tuple(p.rstrip("*") for p in rule.paths if p.endswith(("*", "/")))
        budgets: list[tuple[str, TokenBudget]] = []
        if rule.tokens_per_minute:
            budgets.append((f"{rule.zone_name}:minute", TokenBudget.per_minute(
                rule.tokens_per_minute)))
        if rule.tokens_per_day:
            budgets.append((f"{rule.zone_name}:day", TokenBudget.per_day(rule.tokens_per_day)))
        params = (ReqZoneParams.from_config(rule.rate, burst=rule.burst, delay=rule.delay,
                                            nodelay=rule.nodelay) if rule.rate else None)
        return cls(rule, exact, prefixes, frozenset(rule.methods),
                   frozenset(normalize_model(m) for m in rule.models), frozenset(rule.tiers),
                   params, tuple(budgets))

    def matches(self, method: str, path: str, tier: str) -> bool:
        """Whether the rule applies, judged on the request's head alone: a rule that
        names models also needs the model (``models_match``)."""
        if (self.exact or self.prefixes) and path not in self.exact and not any(
                path.startswith(p) for p in self.prefixes):
            return False
        if self.methods and method not in self.methods:
            return False
        return not self.tiers or tier in self.tiers

    def models_match(self, model: str | None) -> bool:
        return not self.models or (model is not None and model in self.models)

    def key(self, request: web.BaseRequest, client: Client) -> str:
        kind = self.cfg.key
        if kind == "ip":
            return client.ip
        if kind == "api_key":
            # Anonymous clients fall back to their IP: otherwise they would all share
            # (and exhaust) one empty-key budget, or escape the rule entirely.
            return f"key:{client.key_name}" if client.key_name else f"ip:{client.ip}"
        if kind == "tier":
            return client.tier
        return request.headers.get(kind.removeprefix("header:"), "")


@dataclass
class Verdict:
    """What admission decided; ``response`` is set when the request is refused."""

    response: web.Response | None = None
    rule: str | None = None
    outcome: str = "passed"
    delay_ms: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    lease: ConnLease | None = None
    dry_lease: ConnLease | None = None
    token_calls: tuple[TokenCall, ...] = ()
    # Stage HEAD: some zone waits for the model (stage BODY decides it).
    deferred: bool = False
    # Stage BODY's verdict, released with this one.
    then: Verdict | None = None


class Stage(enum.Enum):
    """When an inference request is judged. Its body is read only after the limits
    that do not need it: a client an IP limit refuses never gets its body read.

    HEAD, before the body: every rule that names no models, unless an earlier rule of
    its zone names models (the first matching rule of a zone wins, so that zone must
    wait for the model). BODY, once the model is known: those waiting zones. A request
    refused at BODY has been counted by the zones decided at HEAD, as a request nginx
    passes through ``limit_req`` and then refuses elsewhere."""

    HEAD = "head"
    BODY = "body"


class Admission:
    def __init__(self, settings: Settings, store: LimitStore,
                 on_decision: Callable[[str, str], None] | None = None) -> None:
        self.rules = [_Rule.compile(r) for r in settings.limits.rules]
        self.deny_on_store_error = settings.limits.on_store_error == "deny"
        self.store = store
        self.enabled = bool(self.rules)
        self._leases: set[ConnLease] = set()
        self._outage = False
        self._task: asyncio.Task[None] | None = None
        self.on_decision = on_decision

    # -- lifespan: limit_conn leases are refreshed in one background loop ------------

    def start(self) -> None:
        if self._task is None and any(r.cfg.max_concurrent for r in self.rules):
            self._task = asyncio.get_running_loop().create_task(self._refresh_leases())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()

    def adopt(self, previous: Admission) -> None:
        """Take over from the admission a reload replaces: its held leases (their
        requests still run) and the lease refresher; the store is shared."""
        if previous._task is not None:
            previous._task.cancel()
        self._leases |= previous._leases
        self._outage = previous._outage
        self.start()

    async def _refresh_leases(self) -> None:
        while True:
            await asyncio.sleep(DEFAULT_CONN_LEASE_MS / 3000)
            for lease in list(self._leases):
                with contextlib.suppress(StoreError):
                    await self.store.conn_refresh(lease)

    # -- the request side ------------------------------------------------------------

    def _count(self, rule: str, outcome: str) -> None:
        if self.on_decision is not None:
            self.on_decision(rule, outcome)

    def _store_failed(self, exc: StoreError) -> bool:
        """Log once per outage; True when the request must be refused."""
        if not self._outage:
            self._outage = True
            log.warning("limit store unavailable (%s): %s requests until it is back", exc,
                        "refusing" if self.deny_on_store_error else "allowing")
        return self.deny_on_store_error

    def _store_ok(self) -> None:
        if self._outage:
            self._outage = False
            log.warning("limit store is back")

    async def admit(self, request: web.BaseRequest, client: Client, model: str | None,
                    openai: bool, stage: Stage | None = None,
                    waited_ms: int = 0) -> Verdict:
        """Judge the request by every rule that applies (``stage``: only those decided
        at that stage). ``waited_ms``: the delay an earlier stage has already served,
        so the request waits for the longest over all zones, as in nginx."""
        verdict = Verdict()
        if not self.enabled:
            return verdict
        method, path, tier = request.method, request.path, client.tier
        seen: set[str] = set()
        waiting: set[str] = set()       # zones whose first matching rule names models
        req_rules: list[tuple[_Rule, str]] = []
        conn_rules: list[tuple[_Rule, str]] = []
        token_rules: list[tuple[_Rule, str]] = []
        for rule in self.rules:
            zone = rule.cfg.zone_name
            if zone in seen or not rule.matches(method, path, tier):
                continue
            if stage is not None:
                later = bool(rule.models) or zone in waiting
                if later:
                    waiting.add(zone)
                    if stage is Stage.HEAD:
                        verdict.deferred = True
                        continue
                elif stage is Stage.BODY:
                    # Decided at HEAD: only note the zone as taken, as HEAD did.
                    if rule.key(request, client):
                        seen.add(zone)
                    continue
            if not rule.models_match(model):
                continue
            key = rule.key(request, client)
            if not key:
                continue            # nginx: an empty key is not accounted
            seen.add(zone)
            target = (req_rules if rule.params is not None else
                      conn_rules if rule.cfg.max_concurrent else token_rules)
            target.append((rule, key))
        failed = False
        try:
            if req_rules and await self._limit_req(req_rules, verdict, openai):
                self._store_ok()
                return verdict
            if token_rules and await self._tokens(token_rules, verdict, openai):
                self._store_ok()
                return verdict
        except StoreError as exc:
            if self._store_failed(exc):
                return self._store_refusal(verdict, openai)
            failed = True       # allowed; and no second wait on a store that is down
        if verdict.delay_ms:
            # nginx's delay: the request is already counted and waits here, before it
            # is scheduled (holding no backend slot) and before limit_conn counts it.
            # A client that leaves meanwhile cancels this wait.
            await asyncio.sleep(max(verdict.delay_ms - waited_ms, 0) / 1000)
        if conn_rules and not failed:
            try:
                await self._limit_conn(conn_rules, verdict, openai)
            except StoreError as exc:
                if self._store_failed(exc):
                    return self._store_refusal(verdict, openai)
                failed = True
        if not failed and (req_rules or token_rules or conn_rules):
            self._store_ok()
        return verdict

    def _store_refusal(self, verdict: Verdict, openai: bool) -> Verdict:
        verdict.response = _refuse(503, "rate limit state is unavailable; try again",
                                   openai, {"Retry-After": "1"})
        verdict.outcome = "store_error"
        return verdict

    def _note_dry(self, verdict: Verdict, rule: str, outcome: str) -> None:
        """Dry-run decisions are reported when nothing real happened to the request."""
        if outcome != "passed" and verdict.outcome == "passed" and verdict.rule is None:
            verdict.rule, verdict.outcome = rule, outcome

    async def _limit_req(self, rules: list[tuple[_Rule, str]], verdict: Verdict,
                         openai: bool) -> bool:
        real = [(r, k) for r, k in rules if not r.cfg.dry_run and accountable_key(k)]
        dry = [(r, k) for r, k in rules if r.cfg.dry_run and accountable_key(k)]
        dry_outcome: tuple[str, str] | None = None
        if dry:
            d = await self.store.limit_req(_req_calls(dry), dry_run=True)
            outcome = _outcome(d.status, dry_run=True)
            for r, _ in dry:
                self._count(r.cfg.name, outcome)
            culprit = dry[d.zone_index or 0][0] if d.zone_index is not None else dry[0][0]
            dry_outcome = (culprit.cfg.name, outcome)
        if not real:
            if dry_outcome is not None:
                self._note_dry(verdict, *dry_outcome)
            return False
        decision = await self.store.limit_req(_req_calls(real))
        if decision.rejected:
            rule = real[decision.zone_index or 0][0]
            self._count(rule.cfg.name, "rejected")
            retry = max(1, math.ceil(decision.retry_after_ms / 1000))
            params = rule.params
            assert params is not None
            headers = {"Retry-After": str(retry), **_ratelimit_headers(rule, params, 0, retry)}
            verdict.response = _refuse(
                rule.cfg.status, f"rate limit exceeded ({rule.cfg.name}); retry in {retry}s",
                openai, headers)
            verdict.rule, verdict.outcome = rule.cfg.name, "rejected"
            return True
        verdict.delay_ms = decision.delay_ms
        verdict.outcome = "delayed" if decision.delay_ms else "passed"
        if dry_outcome is not None:
            self._note_dry(verdict, *dry_outcome)
        # Tell the client about its tightest zone.
        tightest: tuple[int, _Rule, int] | None = None
        for (rule, _), excess in zip(real, decision.excess, strict=False):
            assert rule.params is not None
            left = remaining(rule.params, excess)
            self._count(rule.cfg.name, verdict.outcome)
            if tightest is None or left < tightest[0]:
                tightest = (left, rule, excess)
        if tightest is not None:
            left, rule, excess = tightest
            if verdict.outcome == "delayed":
                verdict.rule = rule.cfg.name
            assert rule.params is not None
            verdict.headers.update(_ratelimit_headers(
                rule, rule.params, left, math.ceil(reset_ms(rule.params, excess) / 1000)))
        return False

    async def _tokens(self, rules: list[tuple[_Rule, str]], verdict: Verdict,
                      openai: bool) -> bool:
        calls = [TokenCall(zone, key, budget) for r, key in rules for zone, budget in r.budgets]
        owners = [r for r, _ in rules for _ in r.budgets]
        real = [c for c, r in zip(calls, owners, strict=True) if not r.cfg.dry_run]
        verdict.token_calls = tuple(calls)
        if not real:
            return False
        decision = await self.store.tokens_check(real)
        if decision.rejected:
            real_owners = [r for r in owners if not r.cfg.dry_run]
            rule = real_owners[decision.zone_index or 0]
            self._count(rule.cfg.name, "rejected")
            retry = max(1, math.ceil(decision.retry_after_ms / 1000))
            verdict.response = _refuse(
                rule.cfg.status, f"token budget exhausted ({rule.cfg.name}); "
                f"retry in {retry}s", openai, {"Retry-After": str(retry)})
            verdict.rule, verdict.outcome = rule.cfg.name, "rejected"
            return True
        for r in {id(r): r for r in owners}.values():
            self._count(r.cfg.name, "passed")
        return False

    async def _limit_conn(self, rules: list[tuple[_Rule, str]], verdict: Verdict,
                          openai: bool) -> None:
        real = [(r, k) for r, k in rules if not r.cfg.dry_run and conn_key_ok(k)]
        dry = [(r, k) for r, k in rules if r.cfg.dry_run and conn_key_ok(k)]
        if dry:
            # nginx counts a dry-run request it passes (and releases it at the end);
            # one it would refuse is counted nowhere.
            d = await self.store.conn_acquire(
                [ConnCall(r.cfg.zone_name, k, r.cfg.max_concurrent or 1) for r, k in dry],
                dry_run=True)
            outcome = "dry_run_rejected" if d.status is LimitStatus.REJECTED_DRY_RUN else (
                "passed")
            for r, _ in dry:
                self._count(r.cfg.name, outcome)
            self._note_dry(verdict, dry[d.zone_index or 0][0].cfg.name, outcome)
            if d.lease is not None:
                verdict.dry_lease = d.lease
                self._leases.add(d.lease)
        if not real:
            return
        calls = [ConnCall(r.cfg.zone_name, k, r.cfg.max_concurrent or 1) for r, k in real]
        decision = await self.store.conn_acquire(calls)
        if decision.rejected:
            rule = real[decision.zone_index or 0][0]
            self._count(rule.cfg.name, "rejected")
            verdict.response = _refuse(
                rule.cfg.status, f"too many concurrent requests ({rule.cfg.name}: at most "
                f"{rule.cfg.max_concurrent})", openai, {"Retry-After": "1"})
            verdict.rule, verdict.outcome = rule.cfg.name, "rejected"
            return
        for r, _ in real:
            self._count(r.cfg.name, "passed")
        if decision.lease is not None:
            verdict.lease = decision.lease
            self._leases.add(decision.lease)

    async def finish(self, verdict: Verdict, tokens: int) -> None:
        """The response ended (or the client left): release and charge."""
        if verdict.then is not None:
            await self.finish(verdict.then, tokens)
        for lease in (verdict.lease, verdict.dry_lease):
            if lease is not None:
                self._leases.discard(lease)
                with contextlib.suppress(StoreError):
                    await self.store.conn_release(lease)
        if verdict.token_calls and tokens > 0:
            with contextlib.suppress(StoreError):
                await self.store.tokens_charge(verdict.token_calls, tokens)


def _req_calls(rules: Sequence[tuple[_Rule, str]]) -> list[ReqZoneCall]:
    return [ReqZoneCall(r.cfg.zone_name, k, r.params) for r, k in rules
            if r.params is not None]


def _outcome(status: LimitStatus, dry_run: bool) -> str:
    if status in (LimitStatus.REJECTED, LimitStatus.REJECTED_DRY_RUN):
        return "dry_run_rejected" if dry_run else "rejected"
    if status in (LimitStatus.DELAYED, LimitStatus.DELAYED_DRY_RUN):
        return "dry_run_delayed" if dry_run else "delayed"
    return "passed"


def _ratelimit_headers(rule: _Rule, params: ReqZoneParams, left: int,
                       reset_s: int) -> dict[str, str]:
    """IETF RateLimit fields: the policy's quota (1 + burst) over the time it takes to
    drain, and what is left now with the seconds until full."""
    quota = 1 + params.burst // 1000
    window = max(1, math.ceil(quota * 1_000_000 / params.rate / 1000))
    name = rule.cfg.name
    return {"RateLimit-Policy": f'"{name}";q={quota};w={window}',
            "RateLimit": f'"{name}";r={left};t={max(reset_s, 0)}'}


def _refuse(status: int, message: str, openai: bool, headers: dict[str, str]) -> web.Response:
    return error_response(status, message, openai, headers)
