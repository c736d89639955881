"""Configuration: defaults, durations, and errors naming file, line and key."""

from typing import Any

import pytest

from corral.config import ConfigError, load_settings, load_settings_text, parse_duration


def test_defaults() -> None:
    s = load_settings(None)
    assert s.listen == "0.0.0.0:8080"
    assert s.backends[0].url == "http://127.0.0.1:11434"
    assert s.backends[0].name == "127.0.0.1:11434"
    assert s.state == "memory"
    assert s.timeouts.first_byte == 300


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("10s", 10), ("5m", 300),
                                               ("1h", 3600), (3, 3.0), ("1.5s", 1.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_errors_name_file_line_and_key() -> None:
    text = (
        "listen: 0.0.0.0:8080\n"
        "backends:\n"
        "  - url: http://127.0.0.1:11434\n"
        "    max_concurency: 2\n"
        "timeouts:\n"
        "  read: 5x\n"
        "limits:\n"
        "  - name: gen\n"
        "    rate: 10r/h\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings_text(text, "corral.yaml")
    errors = info.value.errors
    assert "corral.yaml:4: backends[0].max_concurency: unknown key" in errors
    assert any(e.startswith("corral.yaml:6: timeouts.read: invalid duration") for e in errors)
    assert any(e.startswith("corral.yaml:9: limits[gen].rate: invalid rate") for e in errors)


@pytest.mark.parametrize("bad", [
    "backends: []",
    "backends:\n  - url: http://a:1\n    name: x\n  - url: http://b:1\n    name: x",
    "listen: nowhere",
    "state: postgres://x",
    "limits:\n  - {name: a, rate: 0r/s}",
    "limits:\n  - {name: a, rate: 1r/s, delay: 1, nodelay: true}",
    "limits:\n  - {name: a, rate: 1r/s, burst: -1}",
    "limits:\n  - {name: a, rate: 1r/s, tiers: [gold]}",
    "keys:\n  - {name: k, key: s, tier: gold}",
    "keys:\n  - {name: k}",
    "queue: {fairness: lottery}",
    "retry: {on: [teapot]}",
    "retry:\n  on: [teapot]",
])
def test_invalid_configs_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        load_settings_text(bad)


def test_limits_as_mapping_or_list() -> None:
    a = load_settings_text("limits:\n  - {name: a, rate: 10r/m, burst: 3, nodelay: true}")
    b = load_settings_text(
        "limits:\n  on_store_error: deny\n  rules:\n    - {name: a, rate: 10r/m, burst: 3, "
        "nodelay: true}")
    assert a.limits.rules == b.limits.rules
    assert b.limits.on_store_error == "deny"


def test_keys_hash_command_matches_identification() -> None:
    from click.testing import CliRunner

    from corral.cli import main
    from corral.pipeline.identify import hash_key

    result = CliRunner().invoke(main, ["keys", "hash", "sk-alice"])
    assert result.exit_code == 0
    assert result.output.strip() == hash_key("sk-alice")
    assert len(result.output.strip()) == 64
    piped = CliRunner().invoke(main, ["keys", "hash"], input="sk-alice\n")
    assert piped.output.strip() == hash_key("sk-alice")


def test_check_command_exit_status(tmp_path: Any) -> None:
    from click.testing import CliRunner

    from corral.cli import main

    good = tmp_path / "good.yaml"
    good.write_text("backends:\n  - url: http://127.0.0.1:11434\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  - url: http://127.0.0.1:11434\nlimits:\n"
                   "  - {name: gen, rate: 10r/h}\n")
    ok = CliRunner().invoke(main, ["check", "-c", str(good)])
    assert ok.exit_code == 0 and '"listen": "0.0.0.0:8080"' in ok.output
    refused = CliRunner().invoke(main, ["check", "-c", str(bad)])
    assert refused.exit_code == 1
    assert "bad.yaml:4: limits[gen].rate: invalid rate" in refused.output
    odd = tmp_path / "odd.yaml"
    odd.write_text("tiers:\n  premium: {priority: high, preemptible: true}\n"
                   "  basic: {}\n")
    warned = CliRunner().invoke(main, ["check", "-q", "-c", str(odd)])
    assert warned.exit_code == 0
    assert "odd.yaml: warning: tiers.premium.preemptible: true has no effect" in warned.output


def test_check_ends_with_its_verdict_on_the_file_not_with_nothing_started(
        tmp_path: Any) -> None:
    from click.testing import CliRunner

    from corral.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  - {name: gen, rate: 10r/h}\n")
    done = CliRunner().invoke(main, ["check", "-c", str(bad)])
    assert done.exit_code == 1
    # check starts nothing, so it never says so: its last line is its verdict.
    assert done.output.splitlines()[-1] == f"corral: the configuration file {bad} is invalid"
    assert "nothing started" not in done.output


def test_serve_refuses_an_invalid_config_and_starts_nothing(tmp_path: Any) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 127.0.0.1:0\nlimits:\n  - {name: gen, rate: 5r/s, delay: 1, "
                   "nodelay: true}\n")
    done = subprocess.run([sys.executable, "-m", "corral", "serve", "-c", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "limits[gen]" in done.stderr and "delay and nodelay" in done.stderr
    assert "nothing started" in done.stderr


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings_text(text, "c.yaml")
    return info.value.errors


@pytest.mark.parametrize(("text", "expected"), [
    ("keys: abc", "c.yaml:1: keys: expected a list, not a text 'abc'"),
    ("backends: {url: x}", "c.yaml:1: backends: expected a list, not a mapping"),
    ("tiers: [a]", "c.yaml:1: tiers: expected a mapping of keys, not a list"),
    ("queue: {max_preemptions: -1}", "c.yaml:1: queue.max_preemptions: must be at least 0, "
                                     "not -1"),
    ("queue: {max_preemptions: 101}", "c.yaml:1: queue.max_preemptions: must be at most 100, "
                                      "not 101"),
    ("routing: {load_time: 50ms}", "c.yaml:1: routing.load_time: must be between 100ms and "
                                   "1h, not 0.05s"),
    ("routing: {load_time: 2h}", "c.yaml:1: routing.load_time: must be between 100ms and 1h, "
                                 "not 7200s"),
    ("backends: [{url: 'http://a:1', max_loaded_models: 0}]",
     "c.yaml:1: backends[0].max_loaded_models: must be at least 1, not 0"),
    ("tiers: {a: {priority: urgent}}", "c.yaml:1: tiers.a.priority: must be 'high', 'normal' "
                                       "or 'low'"),
    ("tiers: {a: {preemptible: sometimes}}",
     "c.yaml:1: tiers.a.preemptible: expected true or false, not a text 'sometimes'"),
])
def test_errors_are_in_plain_words(text: str, expected: str) -> None:
    errors = _errors(text)
    assert errors == [expected]
    assert not any("Input should" in e or "valid tuple" in e for e in errors)


def test_an_empty_key_takes_its_default() -> None:
    s = load_settings_text("keys:\nlimits:\ntiers:\nqueue:\n  max_wait:\n", "c.yaml")
    assert s.keys == () and s.limits.rules == () and "premium" in s.tiers
    assert s.queue.max_wait == 120


def test_scheduler_settings_and_their_defaults() -> None:
    from corral.config import config_warnings

    s = load_settings_text(
        "routing: {load_time: 2s}\nqueue: {max_preemptions: 3}\n"
        "backends: [{url: 'http://a:1', max_loaded_models: 2}]\n", "c.yaml")
    assert s.routing.load_time == 2 and s.queue.max_preemptions == 3
    assert s.backends[0].max_loaded_models == 2
    # preemptible defaults to true for the low class only
    assert [n for n, t in s.tiers.items() if t.is_preemptible] == ["batch"]
    assert config_warnings(s) == []
    s = load_settings_text("tiers: {premium: {priority: high, preemptible: true},\n"
                           "        batch: {priority: low}}\n"
                           "clients: {default_tier: batch}\n", "c.yaml")
    [warning] = config_warnings(s)
    assert warning.startswith("tiers.premium.preemptible: true has no effect")
    s = load_settings_text("queue: {max_preemptions: 0}", "c.yaml")
    assert config_warnings(s) == ["queue.max_preemptions: 0 turns preemption off for every "
                                  "tier"]


def test_retry_on_is_a_key_not_a_boolean() -> None:
    # YAML 1.1 reads a bare ``on`` as true; the documented key must still work, and
    # boolean settings still take yes/no.
    s = load_settings_text("retry:\n  on: [error, 502]\n  tries: 3\n"
                           "limits:\n  - {name: a, rate: 1r/s, nodelay: yes}\n"
                           "tiers:\n  basic: {preemptible: on}\n")
    assert s.retry.on == ("error", 502) and s.retry.tries == 3
    assert s.limits.rules[0].nodelay is True and s.tiers["basic"].preemptible is True


def test_a_cross_check_on_a_default_names_its_key() -> None:
    assert _errors("tiers:\n  gold: {}\n") == [
        "c.yaml: clients.default_tier: unknown tier 'basic'"]


@pytest.mark.parametrize(("url", "why"), [
    ("redis://h:x/0", "invalid Redis URL 'redis://h:x/0': Port could not be cast"),
    ("redis://h:6379/abc", "the database must be a number, not 'abc'"),
    ("redis://", "invalid Redis URL 'redis://': no host"),
    ("redis://:secret@h:99999/0", "invalid Redis URL 'redis://***@h:99999/0': Port out"),
    ("postgres://h/0", "use memory or redis://host:6379/0"),
])
def test_a_malformed_state_url_says_why_and_hides_the_password(url: str, why: str) -> None:
    [error] = _errors(f"state: '{url}'")
    assert error.startswith("c.yaml:1: state: ") and why in error
    assert "secret" not in error


def test_check_says_when_the_state_store_cannot_be_reached(tmp_path: Any) -> None:
    import socket

    from click.testing import CliRunner

    from corral.cli import main

    with socket.socket() as s:            # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "c.yaml"
    path.write_text(f"state: 'redis://:pw@127.0.0.1:{port}/0'\n")
    done = CliRunner().invoke(main, ["check", "-q", "-c", str(path)])
    assert done.exit_code == 0
    assert (f"warning: state: Redis at redis://***@127.0.0.1:{port}/0 cannot be reached now"
            in done.output)
    assert "pw@" not in done.output


def test_serve_refuses_an_unreachable_state_store_unless_told_to_carry_on(
        tmp_path: Any) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:            # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deny = tmp_path / "deny.yaml"
    deny.write_text(f"listen: 127.0.0.1:1\nstate: 'redis://127.0.0.1:{port}/0'\n"
                    "queue: {on_store_error: deny}\n")
    done = subprocess.run([sys.executable, "-m", "corral", "serve", "-c", str(deny)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert f"Redis at redis://127.0.0.1:{port}/0 cannot be reached" in done.stderr
    assert "nothing started" in done.stderr


CONFIG = """\
listen:
  - 0.0.0.0:8080
  - nowhere
backends:
  - url: http://10.0.0.1:11434
    name: gpu0
  - url: http://10.0.0.2:11434
    max_concurency: 2
  - name: gpu2
    url: ftp://10.0.0.3
retry:
  on: [error, teapot]
clients:
  trusted_proxies:
    - 10.0.0.0/8
    - bogus
"""


def test_every_error_path_has_one_style() -> None:
    # List entries in brackets, by name when they have one, else by index from 0.
    assert _errors(CONFIG) == [
        "c.yaml:3: listen[1]: invalid listen address 'nowhere': expected host:port, "
        "e.g. 0.0.0.0:8080",
        "c.yaml:8: backends[1].max_concurency: unknown key",
        "c.yaml:10: backends[gpu2].url: invalid backend url 'ftp://10.0.0.3': expected "
        "http://host:port",
        "c.yaml:12: retry.on[1]: unknown condition 'teapot' (error, timeout or a status)",
        "c.yaml:16: clients.trusted_proxies[1]: 'bogus' is not an IP address or CIDR",
    ]


def test_limits_written_as_a_mapping_are_named_as_written() -> None:
    assert _errors("limits:\n  on_store_error: deny\n  rules:\n    - name: a\n"
                   "      rate: 1r/s\n    - name: b\n      rate: 0r/s\n") == [
        "c.yaml:7: limits.rules[b].rate: invalid rate '0r/s': the rate must be greater "
        "than zero"]


def test_an_error_in_one_entry_names_that_entry_once() -> None:
    # The path names the entry: the message does not repeat it.
    assert _errors("keys:\n  - name: alice\n    key: a\n  - name: bob\n") == [
        "c.yaml:4: keys[bob]: give exactly one of key or key_sha256"]


def test_a_value_no_member_of_a_union_takes_is_one_error() -> None:
    assert _errors("listen: 5") == [
        "c.yaml:1: listen: expected a text value or a list, not a number 5"]


CROSS = """\
backends:
  - url: http://10.0.0.1:11434
    name: gpu0
  - url: http://10.0.0.2:11434
    name: gpu0
keys:
  - name: alice
    key: sk-a
    tier: premium
  - name: bob
    key: sk-b
    tier: gold
limits:
  - name: gen
    rate: 1r/s
    zone: shared
  - name: chat
    rate: 2r/s
    zone: shared
    tiers: [platinum]
  - name: gen
    max_concurrent: 2
"""


def test_cross_checks_point_at_the_entry_at_fault_and_all_are_reported() -> None:
    assert _errors(CROSS) == [
        "c.yaml:5: backends[gpu0].name: duplicate name 'gpu0': an earlier backend has it "
        "too (each backend needs its own name)",
        "c.yaml:12: keys[bob].tier: unknown tier 'gold'",
        "c.yaml:20: limits[chat].tiers: unknown tier(s) ['platinum']",
        "c.yaml:19: limits[chat].zone: shares zone 'shared' with rule 'gen' but differs in "
        "kind, rate or key (those belong to the zone)",
        "c.yaml:21: limits[gen].name: duplicate rule name 'gen': an earlier rule has it too",
    ]


def test_unnamed_backends_that_share_a_url_are_pointed_at_by_url() -> None:
    assert _errors("backends:\n  - url: http://a:1\n  - url: http://a:1/\n") == [
        "c.yaml:3: backends[1].url: duplicate name 'a:1': an earlier backend has it too "
        "(each backend needs its own name)"]


@pytest.mark.parametrize(("text", "expected"), [
    # An unclosed bracket is noticed on the next line: the line to fix is where it opens.
    ("listen: x\nbackends:\n  - url: http://a:1\n    name: [gpu0\ntimeouts:\n"
     "  read: 5s\n",
     "c.yaml:4: invalid YAML: the '[' opened on this line is not closed (expected ',' or "
     "']', but got ':' on line 5)"),
    ("queue: {max_depth: 3\nlisten: x\n",
     "c.yaml:1: invalid YAML: the '{' opened on this line is not closed (expected ',' or "
     "'}', but got ':' on line 2)"),
    ("listen: x\naccess_log: \"/var/log/corral.log\n",
     "c.yaml:2: invalid YAML: the quote opened on this line is not closed (the file ends "
     "first)"),
    ("listen: x\ntimeouts\n  read: 5s\n",
     "c.yaml:2: invalid YAML: the key on this line has no ':' (could not find expected ':' "
     "on line 3)"),
    ("backends:\n  - url http://a:1\n    name: gpu0\n",
     "c.yaml:2: invalid YAML: a ':' is missing after the key on this line (what follows "
     "runs on to line 3, where a ':' is not allowed)"),
    # Where the mistake is on the line YAML stops at, that line.
    ("listen: x\n  state: memory\n",
     "c.yaml:2: invalid YAML: a ':' is not allowed here: this line continues the value "
     "begun on line 1; is it indented too far?"),
    ("backends:\n  - url: http://a:1\n   name: gpu0\n",
     "c.yaml:3: invalid YAML: this line is indented differently from the lines above it at "
     "the same level (expected <block end>, but found '<block mapping start>')"),
    ("listen: x\nbackends:\n\t- url: http://a:1\n",
     "c.yaml:3: invalid YAML: found character '\\t' that cannot start any token"),
])
def test_a_yaml_syntax_error_names_the_line_to_fix(text: str, expected: str) -> None:
    assert _errors(text) == [expected]
