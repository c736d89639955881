"""Session affinity: which requests belong to one conversation."""

from multidict import CIMultiDict

from corral.pipeline.affinity import Affinity, session_key

NO_HEADERS: CIMultiDict[str] = CIMultiDict()


def test_a_growing_chat_keeps_its_key() -> None:
    first = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hello"}]}
    later = {"messages": [*first["messages"], {"role": "assistant", "content": "hi"},
                          {"role": "user", "content": "more"}]}
    other = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "something else"}]}
    k = session_key("m:latest", first, NO_HEADERS)
    assert k is not None and k == session_key("m:latest", later, NO_HEADERS)
    assert k != session_key("m:latest", other, NO_HEADERS)
    assert k != session_key("n:latest", first, NO_HEADERS)


def test_explicit_session_header_wins_and_empty_requests_have_none() -> None:
    headers = CIMultiDict({"X-Session-ID": "abc"})
    assert session_key("m", {"prompt": "x"}, headers) == "id:abc"
    assert session_key("m", {"prompt": ""}, NO_HEADERS) is None
    assert session_key("m", {"messages": []}, NO_HEADERS) is None


def test_affinity_map_is_bounded() -> None:
    a = Affinity(size=2)
    a.remember("x", "gpu0")
    a.remember("y", "gpu1")
    a.remember("z", "gpu0")
    assert a.get("x") is None and a.get("y") == "gpu1" and a.get("z") == "gpu0"
    assert a.get(None) is None
