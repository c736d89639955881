"""Picking among equally good backends: affinity under a load bound, then the strategy."""

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


def test_least_conn_relative_to_slots_and_round_robin_ties() -> None:
    r = Router("least_conn")
    big = _b("big", slots=4, in_flight=1)     # 25 % busy
    small = _b("small", slots=2, in_flight=1)  # 50 % busy
    assert r.pick([small, big]) is big
    a, b = _b("a", slots=2), _b("b", slots=2)
    picks = {r.pick([a, b]).name for _ in range(4)}
    assert picks == {"a", "b"}


def test_session_affinity_only_under_a_load_bound() -> None:
    r = Router()
    a, b = _b("a", slots=4, in_flight=1), _b("b", slots=4, in_flight=0)
    assert r.pick([a, b], affinity="a") is a          # a quarter busy: still its home
    a.in_flight = 3
    assert r.pick([a, b], affinity="a") is b          # most of it busy: elsewhere


def test_random_two_picks_less_loaded() -> None:
    r = Router("random_two", rng=random.Random(1))
    a = _b("a", slots=10, in_flight=9)
    b = _b("b", slots=10, in_flight=0)
    assert all(r.pick([a, b]) is b for _ in range(10))
