"""The ``jobs:`` settings: defaults and refusals."""

from __future__ import annotations

import pytest

from corral.config import ConfigError, load_settings_text


def test_defaults() -> None:
    jobs = load_settings_text("").jobs
    assert (jobs.callback_hosts, jobs.workers, jobs.max_attempts, jobs.ttl, jobs.lease) == (
        (), 4, 3, 86400.0, 30.0)
    assert (jobs.max_queued, jobs.max_queued_per_client) == (10000, 1000)
    assert (jobs.callback_timeout, jobs.callback_tries, jobs.poll_interval) == (10.0, 3, 1.0)


def test_durations_and_hosts_are_read_as_operators_write_them() -> None:
    jobs = load_settings_text(
        "jobs:\n  callback_hosts: [Hooks.Internal, '127.0.0.1:9000']\n"
        "  ttl: 2h\n  lease: 500ms\n  workers: 0\n").jobs
    assert jobs.callback_hosts == ("hooks.internal", "127.0.0.1:9000")
    assert (jobs.ttl, jobs.lease, jobs.workers) == (7200.0, 0.5, 0)


@pytest.mark.parametrize(("yaml", "where"), [
    ("jobs:\n  lease: 0s\n", "jobs.lease"),
    ("jobs:\n  max_attempts: 0\n", "jobs.max_attempts"),
    ("jobs:\n  workers: -1\n", "jobs.workers"),
    ("jobs:\n  callbacks: []\n", "jobs.callbacks: unknown key"),
])
def test_refusals_name_the_key(yaml: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings_text(yaml, "corral.yaml")
    assert where in str(info.value)
