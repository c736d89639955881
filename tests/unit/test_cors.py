"""Which origins CORS allows: Ollama's default list and pattern rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.config import ConfigError, load_settings_text
from corral.pipeline.cors import DEFAULT_ORIGINS, Cors


@pytest.mark.parametrize("origin", [
    "http://localhost", "http://localhost:3000", "https://localhost:8443",
    "http://127.0.0.1", "http://127.0.0.1:11434", "https://0.0.0.0:1",
    "app://obsidian.md", "file://", "tauri://localhost", "vscode-webview://1abc",
    "vscode-file://vscode-app",
])
def test_ollamas_defaults_allow_local_pages_and_desktop_apps(origin: str) -> None:
    assert Cors(["default"]).allowed(origin)


@pytest.mark.parametrize("origin", [
    "http://example.com", "http://localhost.evil.example", "http://127.0.0.1.evil.example",
    "http://192.168.1.10:3000", "null", "", "localhost:3000", "http://localhost/",
    "http://localhost:3000/path", "javascript:alert(1)", "http://local host",
])
def test_ollamas_defaults_refuse_other_sites_and_malformed_origins(origin: str) -> None:
    assert not Cors(["default"]).allowed(origin)


def test_patterns_star_null_and_off() -> None:
    cors = Cors(["https://*.example.com", "http://intranet:8*"])
    assert cors.allowed("https://chat.example.com")
    assert cors.allowed("https://a.b.example.com")
    assert not cors.allowed("https://example.com")           # the dot belongs to the pattern
    assert not cors.allowed("http://chat.example.com")       # the scheme too
    assert not cors.allowed("https://chat.example.com:8443")  # and the (absent) port
    assert cors.allowed("http://intranet:8080")
    assert not cors.allowed("http://localhost")               # default not listed
    everything = Cors(["*"])
    assert everything.allowed("https://anything.example")
    assert not everything.allowed("null")                     # * does not cover null
    assert not everything.allowed("not an origin")
    assert Cors(["null"]).allowed("null")
    assert not Cors([]).enabled


@given(st.from_regex(r"[a-z]{1,8}\.[a-z]{2,5}", fullmatch=True),
       st.integers(min_value=1, max_value=65535))
def test_a_listed_origin_allows_itself_and_no_port_variant(host: str, port: int) -> None:
    origin = f"https://{host}"
    cors = Cors([origin])
    assert cors.allowed(origin)
    assert not cors.allowed(f"{origin}:{port}")
    assert not cors.allowed(f"http://{host}")


def test_default_is_ollamas_list() -> None:
    assert "http://localhost:*" in DEFAULT_ORIGINS and "app://*" in DEFAULT_ORIGINS


def test_config_validates_origins_and_lower_cases_them() -> None:
    s = load_settings_text("cors:\n  origins: [default, HTTPS://App.Example.com, 'null']\n")
    assert s.cors.origins == ("default", "https://app.example.com", "null")
    assert load_settings_text("cors: {origins: []}\n").cors.origins == ()
    assert load_settings_text("").cors.origins == ("default",)
    for bad in ("app.example.com", "https://app.example.com/", "https://a b",
                "https://x.example/path"):
        with pytest.raises(ConfigError) as err:
            load_settings_text(f"cors:\n  origins: ['{bad}']\n")
        assert "cors.origins" in str(err.value) and "is not an origin" in str(err.value)
