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
        for item in value:
            if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
                code = int(item)
                if not 400 <= code <= 599:
                    raise ValueError(f"retry.on: {code} is not an HTTP error status")
                out.append(code)
            elif item in _RETRY_WORDS:
                out.append(item)
            else:
                raise ValueError(
                    f"retry.on: unknown condition {item!r} (error, timeout or a status)")
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
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {cidr!r} is not an IP address or CIDR") from None
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
            raise ValueError(f"key {self.name!r}: give exactly one of key or key_sha256")
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
            raise ValueError(
                f"limit {self.name!r}: give exactly one of rate, max_concurrent, "
                "tokens_per_minute/tokens_per_day"
            )
        if self.rate is None and (self.burst or self.nodelay or self.delay is not None):
            raise ValueError(f"limit {self.name!r}: burst, nodelay and delay go with rate")
        if self.nodelay and self.delay is not None:
            raise ValueError(f"limit {self.name!r}: delay and nodelay exclude each other")
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
        if not 1.0 <= value <= 300.0:
            raise ValueError(f"must be between 1s and 5m, not {value:g}s")
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
    # SQLite file when state is memory; default: corral-usage.sqlite3 beside the
    # configuration file (the working directory without one).
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
        return tuple(check_origin_pattern(o) for o in value)


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
        for entry in entries:
            host, port, _ = _parse_listen(entry)
            if (host, port) in seen:
                raise ValueError(f"{host}:{port} is listed twice")
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
        names = [b.name for b in self.backends]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"backends: duplicate name(s) {sorted(dup)}")
        if not self.backends:
            raise ValueError("backends: at least one backend is needed")
        if self.clients.default_tier not in self.tiers:
            raise ValueError(f"clients.default_tier: unknown tier {self.clients.default_tier!r}")
        for key in self.keys:
            if key.tier is not None and key.tier not in self.tiers:
                raise ValueError(f"keys: key {key.name!r} names unknown tier {key.tier!r}")
        if self.tls is None and any(entry.tls for entry in self.listeners):
            raise ValueError("listen: an address marked tls needs a tls section "
                             "({cert: PATH, key: PATH})")
        rule_names = [r.name for r in self.limits.rules]
        dup = {n for n in rule_names if rule_names.count(n) > 1}
        if dup:
            raise ValueError(f"limits: duplicate rule name(s) {sorted(dup)}")
        zones: dict[str, LimitRule] = {}
        for rule in self.limits.rules:
            unknown = [t for t in rule.tiers if t not in self.tiers]
            if unknown:
                raise ValueError(f"limits: rule {rule.name!r} names unknown tier(s) {unknown}")
            first = zones.setdefault(rule.zone or rule.name, rule)
            if first is not rule and (rule.kind != first.kind or rule.rate != first.rate
                                      or rule.key != first.key):
                raise ValueError(
                    f"limits: rules {first.name!r} and {rule.name!r} share zone "
                    f"{rule.zone!r} but differ in kind, rate or key (those belong to the zone)")
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


def _loc_to_path(loc: tuple[int | str, ...]) -> tuple[Any, ...]:
    # ``limits`` given as a list is wrapped into {"rules": [...]}: map its loc back.
    if len(loc) >= 2 and loc[0] == "limits" and loc[1] == "rules":
        return ("limits", *loc[2:])
    return tuple(loc)


def _named(path: tuple[Any, ...], data: Any) -> str:
    """Dotted key path, with list items shown by their ``name`` when they have one:
    ``limits[generate-per-ip].rate`` says more than ``limits.0.rate``."""
    parts: list[str] = []
    node = data
    for p in path:
        if isinstance(p, int) and isinstance(node, list) and p < len(node):
            node = node[p]
            name = node.get("name") if isinstance(node, dict) else None
            parts.append(f"[{name}]" if isinstance(name, str) else f".{p}")
            continue
        node = node.get(p) if isinstance(node, dict) else None
        parts.append(f".{p}")
    return "".join(parts).lstrip(".") or "(top level)"


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
        loc = _loc_to_path(tuple(err["loc"]))
        # pydantic adds the validator's type to the loc of union members; keep real keys.
        key_path = tuple(p for p in loc if isinstance(p, int) or p in _known_path_words(loc))
        message = _plain(err)
        if not key_path:
            # Cross-field checks name their key first ("limits: ..."): point there.
            head = tuple(message.split(":", 1)[0].split("."))
            if ":" in message and (head in lines or head[:1] in _TOP_KEYS):
                # Also for a key the file does not write (its default is at fault).
                key_path, message = head, message.split(":", 1)[1].strip()
        line = None
        probe = key_path
        while probe and line is None:
            line = lines.get(probe)
            probe = probe[:-1]
        where = f"{source}:{line}" if line else source
        dotted = _named(key_path, data)
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        out.append(f"{where}: {dotted}: {message}")
    return out


_TOP_KEYS = frozenset((k,) for k in Settings.model_fields)


def _known_path_words(loc: tuple[Any, ...]) -> set[str]:
    # Everything in loc that is not a pydantic type tag such as "function-before[...]".
    return {p for p in loc if isinstance(p, str) and "[" not in p}


def load_settings_text(text: str, source: str = "<config>",
                       base: Path | None = None) -> Settings:
    """``base``: the directory relative paths in the configuration start from."""
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)     # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
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
