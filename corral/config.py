"""Configuration: YAML → validated, frozen settings.

Every key of DESIGN.md's configuration is a public interface: names here must not
change. Unknown keys are errors (``extra="forbid"``) because a misspelt limit that is
silently ignored is worse than a refusal to start. Errors name the file, the line and
the dotted key, like ``nginx -t``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_RATE = re.compile(r"^\s*(\d+)\s*r/(s|m)\s*$")


def parse_duration(value: Any) -> float:
    """``500ms``, ``10s``, ``5m``, ``1h``, ``2d`` or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 500ms, 10s or 5m is expected, not a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"invalid duration {value!r}: use a number with ms, s, m, h or d")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def check_rate(value: Any) -> str:
    """Rates are written as nginx writes them: ``10r/s`` or ``30r/m``, greater than zero."""
    if not isinstance(value, str) or not _RATE.match(value):
        raise ValueError(f"invalid rate {value!r}: use Nr/s or Nr/m, e.g. 10r/s or 30r/m")
    if int(_RATE.match(value).group(1)) == 0:  # type: ignore[union-attr]
        raise ValueError(f"invalid rate {value!r}: the rate must be greater than zero")
    return value.replace(" ", "")


def check_redis_url(url: str) -> str:
    """A Redis URL that names a server: a host (or a socket path), a port that is a
    number, a database that is a number."""
    from redis.connection import parse_url

    shown = re.sub(r"//[^@/]*@", "//***@", url)     # never echo a password
    try:
        parts = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ValueError(f"invalid Redis URL {shown!r}: {exc}") from None
    if not parts.get("host") and not parts.get("path"):
        raise ValueError(f"invalid Redis URL {shown!r}: no host")
    path = url.split("?", 1)[0].split("//", 1)[1].split("/", 1)
    if url.startswith(("redis://", "rediss://")) and len(path) == 2 and path[1] \
            and not path[1].isdigit():
        raise ValueError(f"invalid Redis URL {shown!r}: the database must be a number, "
                         f"not {path[1]!r}")
    return url


class Faults(ValueError):
    """Problems found by a validator, each with the key path it belongs to, relative
    to the value being validated. pydantic places a model check at the model itself
    (the line of ``keys:``); with a path, the error names the entry and line at fault
    (``keys[bob].tier`` on the line of that ``tier:``)."""

    def __init__(self, faults: list[tuple[tuple[str | int, ...], str]]) -> None:
        # Read without a file (settings built in code): indexes in the one style too.
        super().__init__("; ".join(
            "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
            + f": {message}" if path else message
            for path, message in faults))
        self.faults = faults


def fault(path: tuple[str | int, ...], message: str) -> Faults:
    """One problem at ``path`` below the value being validated."""
    return Faults([(path, message)])


Duration = Annotated[float, BeforeValidator(parse_duration)]
Rate = Annotated[str, BeforeValidator(check_rate)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_host_port(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid {what} {value!r}: expected host:port, e.g. 0.0.0.0:8080")
    return host.strip("[]") or "0.0.0.0", int(port)


class BackendConfig(_Model):
    url: str
    name: str = ""
    max_concurrency: int = Field(1, ge=1, le=4096)
    weight: int = Field(1, ge=1, le=1000)
    # OLLAMA_MAX_LOADED_MODELS of this backend; unset: learned from /api/ps.
    max_loaded_models: int | None = Field(None, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid backend url {value!r}: expected http://host:port")
        try:
            parts.port  # noqa: B018 - raises on an out-of-range port
        except ValueError as exc:
            raise ValueError(f"invalid backend url {value!r}: {exc}") from None
        return value.rstrip("/")

    @model_validator(mode="after")
    def _default_name(self) -> BackendConfig:
        if not self.name:
            parts = urlsplit(self.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            object.__setattr__(self, "name", f"{parts.hostname}:{port}")
        return self


class RoutingConfig(_Model):
    strategy: Literal["least_conn", "round_robin", "random_two"] = "least_conn"
    prefer_loaded: bool = True
    affinity: Literal["none", "session"] = "none"
    # A model's load time until one is measured (load_duration of Ollama's answers).
    load_time: Duration = 10.0

    @field_validator("load_time")
    @classmethod
    def _load_time(cls, value: float) -> float:
        if not 0.1 <= value <= 3600:
            raise ValueError(f"must be between 100ms and 1h, not {value:g}s")
        return value


class HealthConfig(_Model):
    interval: Duration = 10.0
    timeout: Duration = 2.0
    fall: int = Field(3, ge=1)
    rise: int = Field(2, ge=1)
    max_fails: int = Field(3, ge=0)
    fail_timeout: Duration = 30.0


_RETRY_WORDS = {"error", "timeout"}


class RetryConfig(_Model):
    on: tuple[str | int, ...] = ("error", "timeout", 500, 502, 503, 504)
    tries: int = Field(2, ge=1, le=100)

    @field_validator("on")
    @classmethod
    def _on(cls, value: tuple[str | int, ...]) -> tuple[str | int, ...]:
        out: list[str | int] = []
        for index, item in enumerate(value):
            if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
                code = int(item)
                if not 400 <= code <= 599:
                    raise fault((index,), f"{code} is not an HTTP error status")
                out.append(code)
            elif item in _RETRY_WORDS:
                out.append(item)
            else:
                raise fault((index,),
                            f"unknown condition {item!r} (error, timeout or a status)")
        return tuple(out)


class TimeoutsConfig(_Model):
    connect: Duration = 5.0
    first_byte: Duration = 300.0
    read: Duration = 300.0
    client_body: Duration = 60.0     # to receive a request body (nginx client_body_timeout)


class ClientsConfig(_Model):
    identify: tuple[Literal["api_key", "ip"], ...] = ("api_key", "ip")
    trusted_proxies: tuple[str, ...] = ()
    require_api_key: bool = False
    default_tier: str = "basic"

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, cidr in enumerate(value):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise fault((index,), f"{cidr!r} is not an IP address or CIDR") from None
        return value


class KeyConfig(_Model):
    name: str = Field(min_length=1)
    key: str | None = Field(None, min_length=1)
    key_sha256: str | None = None
    tier: str | None = None
    admin: bool = False

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("key_sha256 must be 64 hexadecimal characters (corral keys hash)")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self


class TierConfig(_Model):
    priority: Literal["high", "normal", "low"] = "normal"
    weight: float = Field(1.0, gt=0, le=1_000_000)
    # Whether a waiting job of a higher class may stop this tier's requests that have
    # sent nothing to their client yet (they are requeued and run again in full).
    # Unset: true for priority low, false otherwise.
    preemptible: bool | None = None

    @property
    def is_preemptible(self) -> bool:
        return self.priority == "low" if self.preemptible is None else self.preemptible


class LimitRule(_Model):
    name: str = Field(min_length=1)
    # Rules naming the same zone share its state (nginx: several limit_req lines on
    # one zone, e.g. the same per-IP zone with a different burst per location).
    zone: str | None = None
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    key: str = "ip"
    rate: Rate | None = None
    burst: int = Field(0, ge=0)
    nodelay: bool = False
    delay: int | None = Field(None, ge=0)
    dry_run: bool = False
    status: int = Field(429, ge=400, le=599)
    max_concurrent: int | None = Field(None, ge=1, le=65535)
    tokens_per_minute: int | None = Field(None, ge=1)
    tokens_per_day: int | None = Field(None, ge=1)

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if value in ("ip", "api_key", "tier") or re.fullmatch(r"header:[A-Za-z0-9-]+", value):
            return value
        raise ValueError(f"unknown rule key {value!r}: use ip, api_key, tier or header:<Name>")

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.upper() for m in value)

    @property
    def kind(self) -> str:
        if self.rate is not None:
            return "rate"
        return "concurrency" if self.max_concurrent is not None else "tokens"

    @property
    def zone_name(self) -> str:
        return self.zone or self.name

    @model_validator(mode="after")
    def _kind(self) -> LimitRule:
        kinds = [
            self.rate is not None,
            self.max_concurrent is not None,
            self.tokens_per_minute is not None or self.tokens_per_day is not None,
        ]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of rate, max_concurrent, "
                             "tokens_per_minute/tokens_per_day")
        if self.rate is None and (self.burst or self.nodelay or self.delay is not None):
            raise ValueError("burst, nodelay and delay go with rate")
        if self.nodelay and self.delay is not None:
            raise ValueError("delay and nodelay exclude each other")
        return self


class LimitsConfig(_Model):
    """``limits`` is a list of rules, or a mapping ``{on_store_error, rules}``."""

    on_store_error: Literal["allow", "deny"] = "allow"
    rules: tuple[LimitRule, ...] = ()


class QueueConfig(_Model):
    max_depth: int = Field(1000, ge=0)
    max_wait: Duration = 120.0
    fairness: Literal["tokens", "requests", "fifo"] = "tokens"
    # Times one request may be stopped and requeued for a higher class: bounded so
    # that low-class work always finishes.
    max_preemptions: int = Field(2, ge=0, le=100)
    # With several replicas (state in Redis): a slot is a lease that its replica renews
    # while the request runs; the slots of a replica that died come back after this.
    slot_lease: Duration = 10.0
    # While the shared state store cannot be reached: "allow" carries on, each replica
    # with its share of each backend's slots (never more in all); "deny" answers 503.
    on_store_error: Literal["allow", "deny"] = "allow"
    # A client idle this long (one to two times it) loses its fair-share counter, and
    # expired per-client limit state is swept as often: memory follows the clients
    # of the recent past, not every address ever seen.
    forget_idle: Duration = 600.0

    @field_validator("forget_idle")
    @classmethod
    def _forget_idle(cls, value: float) -> float:
        if value < 1.0:
            raise ValueError(f"must be at least 1s, not {value:g}s")
        return value

    @field_validator("slot_lease")
    @classmethod
    def _slot_lease(cls, value: float) -> float:
        # Leases are renewed once a second: a lease shorter than three renewals would
        # lapse under a running request in normal operation.
        if value < 3.0:
            raise ValueError(f"must be at least 3s (three renewal intervals of 1s), "
                             f"not {value:g}s")
        if value > 300.0:
            raise ValueError(f"must be at most 5m, not {value:g}s")
        return value


class JobsConfig(_Model):
    # callback_url must name one of these hosts ("host" or "host:port"): otherwise
    # anyone who may submit a job could make Corral POST to any address it can reach.
    callback_hosts: tuple[str, ...] = ()
    workers: int = Field(4, ge=0)            # jobs run at once by this replica; 0: none
    max_attempts: int = Field(3, ge=1)       # failed tries (5xx, lease lost) before the
                                             #   job fails; busy answers (429/503) are free
    ttl: Duration = 86400.0                  # a finished job is kept this long
    lease: Duration = 30.0                   # a running job returns to the queue when its
                                             #   replica stops refreshing it for this long
    max_queued: int = Field(10000, ge=1)     # unfinished jobs in all; beyond: 503
    max_queued_per_client: int = Field(1000, ge=1)   # beyond: 429
    callback_timeout: Duration = 10.0
    callback_tries: int = Field(3, ge=1)
    poll_interval: Duration = 1.0            # an idle worker looks for work this often

    @field_validator("callback_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Host names are case-insensitive; compare them in one case.
        return tuple(h.strip().lower() for h in value if h.strip())

    @field_validator("lease", "poll_interval", "callback_timeout", "ttl")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value


class MetricsConfig(_Model):
    path: str = "/metrics"


def check_origin_pattern(value: str) -> str:
    """A configured origin (lower-cased: browsers send origins so), or ValueError
    saying what is wrong with it."""
    value = value.lower()
    if value in ("default", "*", "null"):
        return value
    if value != value.strip() or not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^\s/?#]+", value):
        raise ValueError(f"{value!r} is not an origin: write scheme://host or "
                         "scheme://host:port (a * matches any run of characters), "
                         "default, * or null")
    return value


def _resolve(value: str | None, info: ValidationInfo) -> str | None:
    """A relative path is relative to the configuration file's directory, as nginx
    reads paths relative to its configuration: the file can move with its certs."""
    if value is None or not value.strip():
        return None
    path = Path(value).expanduser()
    base = (info.context or {}).get("base")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return str(path)


class TlsConfig(_Model):
    cert: str                       # PEM: the certificate, then its chain
    key: str                        # PEM: its private key, unencrypted
    min_version: Literal["1.2", "1.3"] = "1.2"

    @field_validator("cert", "key")
    @classmethod
    def _path(cls, value: str, info: ValidationInfo) -> str:
        resolved = _resolve(value, info)
        if resolved is None:
            raise ValueError("a file path is needed")
        return resolved

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # 1.2 in YAML is a number; TLSv1.2 is how OpenSSL names it.
        text = str(value).strip().lower().removeprefix("tlsv").removeprefix("tls")
        return text.strip() if text.strip() in ("1.2", "1.3") else value


class UsageConfig(_Model):
    enabled: bool = True
    # SQLite file when state is memory; default: corral-usage.sqlite3 in
    # $STATE_DIRECTORY, else beside the configuration file (corral/usage/location.py).
    path: str | None = None
    keep: int = Field(400, ge=1, le=36600)      # days
    flush: Duration = 2.0                       # how often sums are written

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _resolve(value, info)

    @field_validator("flush")
    @classmethod
    def _flush(cls, value: float) -> float:
        if not 0.05 <= value <= 300:
            raise ValueError("must be between 50ms and 5m")
        return value


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        """Where a client on this machine reaches it (a wildcard address on loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


_LISTEN_FLAGS = {"tls": True, "ssl": True}


def _parse_listen(value: str) -> tuple[str, int, bool]:
    """``host:port``, or ``host:port tls`` for HTTPS (nginx's ``ssl`` is accepted)."""
    address, *flags = value.split()
    unknown = [f for f in flags if f.lower() not in _LISTEN_FLAGS]
    if unknown or len(flags) > 1:
        raise ValueError(f"invalid listen address {value!r}: write host:port, or "
                         "host:port tls for HTTPS")
    host, port = _split_host_port(address, "listen address")
    return host, port, bool(flags)


class CorsConfig(_Model):
    # Ollama's own list by default, so a web app that worked against one Ollama works
    # behind Corral; [] turns CORS off (Origin then passes to the backends untouched).
    origins: tuple[str, ...] = ("default",)

    @field_validator("origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for index, origin in enumerate(value):
            try:
                out.append(check_origin_pattern(origin))
            except ValueError as exc:
                raise fault((index,), str(exc)) from None
        return tuple(out)


def _default_tiers() -> dict[str, TierConfig]:
    return {
        "premium": TierConfig(priority="high", weight=4),
        "basic": TierConfig(priority="normal", weight=1),
        "batch": TierConfig(priority="low", weight=1),
    }


class Settings(_Model):
    listen: str | tuple[str, ...] = "0.0.0.0:8080"
    state: str = "memory"
    backends: tuple[BackendConfig, ...] = (BackendConfig(url="http://127.0.0.1:11434"),)
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    retry: RetryConfig = RetryConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    clients: ClientsConfig = ClientsConfig()
    keys: tuple[KeyConfig, ...] = ()
    tiers: dict[str, TierConfig] = Field(default_factory=_default_tiers)
    limits: LimitsConfig = LimitsConfig()
    queue: QueueConfig = QueueConfig()
    jobs: JobsConfig = JobsConfig()
    metrics: MetricsConfig = MetricsConfig()
    cors: CorsConfig = CorsConfig()
    tls: TlsConfig | None = None
    usage: UsageConfig = UsageConfig()
    access_log: str = "stdout"   # stdout | stderr | off | a file path
    max_body_size: int = Field(100 * 1024 * 1024, ge=1024)
    shutdown_grace: Duration = 30.0

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        entries = (value,) if isinstance(value, str) else value
        if not entries:
            raise ValueError("at least one address is needed")
        seen: set[tuple[str, int]] = set()
        for index, entry in enumerate(entries):
            at: tuple[int, ...] = () if isinstance(value, str) else (index,)
            try:
                host, port, _ = _parse_listen(entry)
            except ValueError as exc:
                raise fault(at, str(exc)) from None
            if (host, port) in seen:
                raise fault(at, f"{host}:{port} is listed twice")
            seen.add((host, port))
        return value

    @field_validator("state")
    @classmethod
    def _state(cls, value: str) -> str:
        if value == "memory":
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"invalid state {value!r}: use memory or redis://host:6379/0")
        return check_redis_url(value)

    @field_validator("limits", mode="before")
    @classmethod
    def _limits_list(cls, value: Any) -> Any:
        return {"rules": value} if isinstance(value, list | tuple) else value

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        # Every problem at once, each at the entry it concerns (``keys[bob].tier``),
        # so one run of corral check shows all there is to fix.
        out: list[tuple[tuple[str | int, ...], str]] = []
        if not self.backends:
            out.append((("backends",), "at least one backend is needed"))
        seen: dict[str, int] = {}
        for i, backend in enumerate(self.backends):
            first = seen.setdefault(backend.name, i)
            if first != i:
                # An unnamed backend is named after its url: that is what repeats.
                key = "name" if "name" in backend.model_fields_set else "url"
                out.append((("backends", i, key),
                            f"duplicate name {backend.name!r}: an earlier backend has it "
                            "too (each backend needs its own name)"))
        if self.clients.default_tier not in self.tiers:
            out.append((("clients", "default_tier"),
                        f"unknown tier {self.clients.default_tier!r}"))
        for i, key_config in enumerate(self.keys):
            if key_config.tier is not None and key_config.tier not in self.tiers:
                out.append((("keys", i, "tier"), f"unknown tier {key_config.tier!r}"))
        if self.tls is None and any(entry.tls for entry in self.listeners):
            out.append((("listen",), "an address marked tls needs a tls section "
                                     "({cert: PATH, key: PATH})"))
        rule_at: dict[str, int] = {}
        zones: dict[str, LimitRule] = {}
        for i, rule in enumerate(self.limits.rules):
            at = ("limits", "rules", i)
            if rule_at.setdefault(rule.name, i) != i:
                out.append(((*at, "name"), f"duplicate rule name {rule.name!r}: an earlier "
                                           "rule has it too"))
            unknown = [t for t in rule.tiers if t not in self.tiers]
            if unknown:
                out.append(((*at, "tiers"), f"unknown tier(s) {unknown}"))
            first_rule = zones.setdefault(rule.zone or rule.name, rule)
            if first_rule is not rule and (rule.kind != first_rule.kind
                                           or rule.rate != first_rule.rate
                                           or rule.key != first_rule.key):
                out.append(((*at, "zone"),
                            f"shares zone {rule.zone!r} with rule {first_rule.name!r} but "
                            "differs in kind, rate or key (those belong to the zone)"))
        if out:
            raise Faults(out)
        return self

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """Every address to listen on. With a ``tls`` section, the addresses marked
        ``tls`` serve HTTPS — all of them when none is marked."""
        entries = (self.listen,) if isinstance(self.listen, str) else self.listen
        parsed = [_parse_listen(e) for e in entries]
        all_tls = self.tls is not None and not any(tls for _, _, tls in parsed)
        return tuple(Listener(h, p, tls or all_tls) for h, p, tls in parsed)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        """The first address: what the replicas and the job workers call this one."""
        first = self.listeners[0]
        return first.host, first.port


def fingerprint(settings: Settings) -> str:
    """What replicas sharing one state store must agree on — backends, limits, tiers
    and keys (names, tiers, admin: never a secret) — as a short digest."""
    import hashlib
    import json

    shared = {
        "backends": [b.model_dump(mode="json") for b in settings.backends],
        "limits": settings.limits.model_dump(mode="json"),
        "tiers": {n: t.model_dump(mode="json") for n, t in sorted(settings.tiers.items())},
        "keys": [[k.name, k.tier, k.admin] for k in settings.keys],
    }
    text = json.dumps(shared, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def max_loaded_models(settings: Settings) -> dict[str, int | None]:
    """Each backend's configured ``max_loaded_models`` (None: learned from /api/ps)."""
    return {b.name: b.max_loaded_models for b in settings.backends}


class ConfigError(Exception):
    """Invalid configuration; ``errors`` are human lines naming file, line and key."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _line_map(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    """Record the 1-based line of every key path in the YAML tree (for error messages)."""
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            out[child] = key_node.start_mark.line + 1
            _line_map(value_node, child, out)
            out[child] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, (*path, index), out)


_ABSENT = object()


def _data_path(loc: tuple[Any, ...], data: Any, absent_ok: bool) -> tuple[Any, ...]:
    """pydantic's location of an error as a path in the file's data. It leaves out
    what pydantic adds: the type tags of union members (``listen.str``) and the
    ``rules`` a list of limits is wrapped in. ``absent_ok``: the path may go on past
    what the file writes (a required key that is missing, a default at fault)."""
    path: list[Any] = []
    node = data
    for part in loc:
        if (isinstance(node, Mapping) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        elif absent_ok and (node is _ABSENT or isinstance(node, Mapping)):
            node = _ABSENT
        else:
            continue
        path.append(part)
    return tuple(path)


def _named(path: tuple[Any, ...], data: Any) -> str:
    """The key path in one style: mapping keys dotted, list entries in brackets and
    named by their ``name`` when they have one, else by their index from 0:
    ``limits[generate-per-ip].rate``, ``backends[1].url``, ``retry.on[2]``."""
    parts: list[str] = []
    node = data
    for p in path:
        if isinstance(p, int) and isinstance(node, list):
            node = node[p] if 0 <= p < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            parts.append(f"[{name}]" if isinstance(name, str) and name else f"[{p}]")
            continue
        node = node.get(p) if isinstance(node, dict) else None
        parts.append(f".{p}")
    return "".join(parts).lstrip(".") or "(top level)"


def _error_line(source: str, lines: dict[tuple[Any, ...], int], data: Any,
                path: tuple[Any, ...], message: str) -> str:
    """``file:line: key: message``, the line being that of the deepest part of the
    path the file writes (the key itself, or the entry a missing key belongs in)."""
    line = None
    probe = path
    while probe and line is None:
        line = lines.get(probe)
        probe = probe[:-1]
    where = f"{source}:{line}" if line else source
    return f"{where}: {_named(path, data)}: {message}"


_KINDS = {bool: "true/false", int: "a number", float: "a number", str: "a text",
          list: "a list", dict: "a mapping"}


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return next((name for t, name in _KINDS.items() if type(value) is t), type(value).__name__)


def _plain(err: Any) -> str:
    """pydantic's message in the operator's words: "expected a list, not a text", never
    its internal vocabulary ("Input should be a valid tuple")."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", not {_kind(value)}" + (f" {value!r}" if isinstance(value, str | int | float)
                                      and not isinstance(value, bool) else "")
    plain = {
        "tuple_type": "expected a list", "list_type": "expected a list",
        "dict_type": "expected a mapping of keys", "model_type": "expected a mapping of keys",
        "model_attributes_type": "expected a mapping of keys",
        "int_type": "expected a whole number", "int_parsing": "expected a whole number",
        "int_from_float": "expected a whole number",
        "float_type": "expected a number", "float_parsing": "expected a number",
        "bool_type": "expected true or false", "bool_parsing": "expected true or false",
        "string_type": "expected a text value",
    }.get(kind)
    if plain is not None:
        return plain + got
    if kind == "missing":
        return "is required"
    if kind == "string_too_short":
        return "must not be empty"
    for bound, words in (("ge", "at least"), ("gt", "greater than"), ("le", "at most"),
                         ("lt", "less than")):
        if bound in ctx and kind.endswith(("than_equal", "than")):
            return f"must be {words} {ctx[bound]}" + (f", not {value!r}"
                                                      if not isinstance(value, dict) else "")
    message = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    return message


def _format_errors(exc: ValidationError, source: str,
                   lines: dict[tuple[Any, ...], int], data: Any) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, Faults):
            for sub, message in error.faults:
                path = _data_path((*loc, *sub), data, absent_ok=True)
                out.append(_error_line(source, lines, data, path, message))
            continue
        key_path = _data_path(loc, data, absent_ok=err["type"] == "missing")
        message = "unknown key" if err["type"] == "extra_forbidden" else _plain(err)
        if not key_path:
            # A model check that names its key first ("limits: ..."): point there.
            named = tuple(message.split(":", 1)[0].split("."))
            if ":" in message and (named in lines or named[:1] in _TOP_KEYS):
                # Also for a key the file does not write (its default is at fault).
                key_path, message = named, message.split(":", 1)[1].strip()
        line = _error_line(source, lines, data, key_path, message)
        head, _, rest = line.partition(": expected ")
        before, _, earlier = out[-1].partition(": expected ") if out else ("", "", "")
        if rest and before == head and earlier.endswith(rest.partition(",")[2]):
            # One value refused by each member of a union (listen: a text or a list):
            # one line saying what would do.
            out[-1] = f"{head}: expected {earlier.partition(',')[0]} or {rest}"
            continue
        out.append(line)
    return out


_TOP_KEYS = frozenset((k,) for k in Settings.model_fields)


def _yaml_error(exc: yaml.YAMLError, source: str, text: str) -> str:
    """A YAML syntax error at the line to fix. PyYAML marks where it gave up, often
    the line after the mistake: an unclosed ``[``, a quote or a key without ``:`` is
    noticed only on the next line, so the line where that construct begins is given,
    and the line PyYAML stopped at is said in words."""
    problem = str(getattr(exc, "problem", None) or exc)
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f"{source}: invalid YAML: {problem}"
    line = mark.line + 1
    context = str(getattr(exc, "context", None) or "")
    start = getattr(exc, "context_mark", None)
    if start is not None and start.line + 1 < line and context.startswith(tuple(_UNFINISHED)):
        what = _UNFINISHED[next(c for c in _UNFINISHED if context.startswith(c))]
        found = ("the file ends first" if "end of stream" in problem
                 else f"{problem} on line {line}")
        return f"{source}:{start.line + 1}: invalid YAML: {what} ({found})"
    if problem.startswith("expected <block end>"):
        return (f"{source}:{line}: invalid YAML: this line is indented differently from "
                f"the lines above it at the same level ({problem})")
    if problem == "mapping values are not allowed here":
        begins, is_value = _plain_scalar_before(text, mark)
        if begins is not None and begins < line and not is_value:
            # "- url http://a" then "name: x": a bare word that runs on into a key on
            # the next line, so the ':' missing is on the first line.
            return (f"{source}:{begins}: invalid YAML: a ':' is missing after the key on "
                    f"this line (what follows runs on to line {line}, where a ':' is "
                    "not allowed)")
        if begins is not None and begins < line:
            # "a: 1" then "  b: 2": the value of a runs on into a line indented too far.
            return (f"{source}:{line}: invalid YAML: a ':' is not allowed here: this line "
                    f"continues the value begun on line {begins}; is it indented too far?")
    return f"{source}:{line}: invalid YAML: {problem}"


_UNFINISHED = {
    "while parsing a flow sequence": "the '[' opened on this line is not closed",
    "while parsing a flow mapping": "the '{' opened on this line is not closed",
    "while scanning a quoted scalar": "the quote opened on this line is not closed",
    "while scanning a simple key": "the key on this line has no ':'",
    "while parsing a flow node": "the entry begun on this line is not finished",
}


def _plain_scalar_before(text: str, mark: Any) -> tuple[int | None, bool]:
    """The 1-based line where the plain text before ``mark`` begins, and whether it
    is the value of a key (``key: text``) rather than a bare word."""
    tokens: list[yaml.Token] = []
    try:
        for token in yaml.scan(text, Loader=_Loader):
            tokens.append(token)
    except yaml.YAMLError:
        pass
    last = tokens[-1] if tokens else None
    if isinstance(last, yaml.ScalarToken) and last.plain and last.end_mark.index <= mark.index:
        is_value = len(tokens) > 1 and isinstance(tokens[-2], yaml.ValueToken)
        return int(last.start_mark.line) + 1, is_value
    return None, False


def load_settings_text(text: str, source: str = "<config>",
                       base: Path | None = None) -> Settings:
    """``base``: the directory relative paths in the configuration start from."""
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)     # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc, source, text)]) from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"{source}:1: the configuration must be a mapping of keys"])
    lines: dict[tuple[Any, ...], int] = {}
    if root is not None:
        _line_map(root, (), lines)
    try:
        return Settings.model_validate(_drop_nulls(data), context={"base": base})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, lines, data)) from None


class _Loader(yaml.SafeLoader):
    """YAML as YAML 1.2 reads booleans: only ``true``/``false``. PyYAML follows YAML
    1.1, where ``on``, ``off``, ``yes`` and ``no`` are booleans too, which would turn
    the key ``retry.on`` into ``True``. Boolean settings still accept ``yes``/``no``
    and ``on``/``off``: validation reads those strings as booleans."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))


def _drop_nulls(data: Any) -> Any:
    """A key left empty in YAML (``keys:`` alone is null) takes its default, as if it
    were not written: every key whose default is not empty accepts no null anyway, and
    ``keys:`` with nothing under it means no keys, not an error."""
    if isinstance(data, Mapping):
        return {k: _drop_nulls(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_drop_nulls(v) for v in data]
    return data


def config_warnings(settings: Settings) -> list[str]:
    """What is valid but probably not what the operator meant (``corral check`` and
    the start print these; nothing is refused for them)."""
    out = []
    order = ("high", "normal", "low")
    top = min((order.index(t.priority) for t in settings.tiers.values()), default=0)
    for name, tier in settings.tiers.items():
        if tier.preemptible and order.index(tier.priority) == top:
            out.append(f"tiers.{name}.preemptible: true has no effect: no tier has a higher "
                       f"priority than {tier.priority!r}, so nothing can preempt it")
    if settings.queue.max_preemptions == 0 and any(t.is_preemptible
                                                   for t in settings.tiers.values()):
        out.append("queue.max_preemptions: 0 turns preemption off for every tier")
    return out


def load_settings(path: str | Path | None) -> Settings:
    """Read and validate a config file; ``None`` gives the documented defaults."""
    if path is None:
        return Settings()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    return load_settings_text(text, str(p), p.resolve().parent)
