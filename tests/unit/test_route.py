"""Backend choice: only eligible backends, resident model preferred, least loaded."""

import random

from corral.backends.backend import Backend, normalize_model
from corral.pipeline.route import Router


def _b(name: str, slots: int = 1, models: tuple[str, ...] = ("m:latest",),
       loaded: tuple[str, ...] = (), in_flight: int = 0, up: bool = True) -> Backend:
    return Backend(name=name, url=f"http://{name}:1", max_concurrency=slots,
                   in_flight=in_flight, up=up, models=frozenset(models),
                   loaded=frozenset(loaded))


def test_normalize_model() -> None:
    assert normalize_model("llama3.2") == "llama3.2:latest"
    assert normalize_model("llama3.2:1b") == "llama3.2:1b"
    assert normalize_model("hf.co/org/model") == "hf.co/org/model:latest"
    assert normalize_model("localhost:5000/x") == "localhost:5000/x:latest"


def test_only_backends_with_model_and_free_slot() -> None:
    r = Router()
    full = _b("full", in_flight=1)
    other = _b("other", models=("x:latest",))
    down = _b("down", up=False)
    assert r.choose([full, other, down], "m:latest", now=0) is None
    ok = _b("ok")
    assert r.choose([full, other, down, ok], "m:latest", now=0) is ok


def test_prefers_resident_model_over_idle_backend() -> None:
    r = Router()
    cold = _b("cold", slots=4)
    warm = _b("warm", slots=4, loaded=("m:latest",), in_flight=2)
    assert r.choose([cold, warm], "m:latest", now=0) is warm
    assert Router(prefer_loaded=False).choose([cold, warm], "m:latest", now=0) is cold


def test_least_conn_relative_to_slots_and_round_robin_ties() -> None:
    r = Router("least_conn")
    big = _b("big", slots=4, in_flight=1)     # 25 % busy
    small = _b("small", slots=2, in_flight=1)  # 50 % busy
    assert r.choose([small, big], "m:latest", now=0) is big
    a, b = _b("a", slots=2), _b("b", slots=2)
    picks = {r.choose([a, b], "m:latest", now=0).name for _ in range(4)}  # type: ignore[union-attr]
    assert picks == {"a", "b"}


def test_excluded_and_failed_backends_are_skipped() -> None:
    r = Router()
    a, b = _b("a"), _b("b")
    b.breaker.max_fails, b.breaker.fail_timeout = 1, 10.0
    b.breaker.on_failure(0.0)
    assert r.choose([a, b], "m:latest", now=5, exclude=frozenset({"a"})) is None
    assert r.choose([a, b], "m:latest", now=11, exclude=frozenset({"a"})) is b


def test_random_two_picks_less_loaded() -> None:
    r = Router("random_two", rng=random.Random(1))
    a = _b("a", slots=10, in_flight=9)
    b = _b("b", slots=10, in_flight=0)
    assert all(r.choose([a, b], "m:latest", now=0) is b for _ in range(10))
