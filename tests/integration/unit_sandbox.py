"""Run a command as a systemd unit with ``ProtectSystem=strict`` and
``StateDirectory=`` would, without systemd and without root.

The command sees the configuration's directory read-only (a bind mount remounted
read-only in a private mount namespace, as ``ProtectSystem=strict`` leaves ``/etc``),
``/var/lib/<state>`` as a writable directory of its own (a directory of the test
bound there, as systemd makes the state directory), and ``$STATE_DIRECTORY`` set as
systemd sets it. It runs as uid 65534 in a user namespace, with no capabilities: what
it may write is what the mode bits and the mounts allow, as for a unit's ``User=``.

Two user namespaces, because the mounts need a namespace root and the command must
not be one: the outer maps its root onto the caller and makes the mounts, the inner
maps the unprivileged uid onto that root and runs the command, which cannot undo the
mounts (they are locked to the outer namespace).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UID = 65534
SETUP_FAILED = 125
_SETUP = r"""
cfg=$1 state=$2 name=$3 uid=$4 failed=$5
shift 5
fail() { echo "unit sandbox: $1" >&2; exit "$failed"; }
mount --bind "$cfg" "$cfg" || fail "bind mount of $cfg"
# Adding nosuid, nodev and noexec: a mount in a user namespace may not clear the
# flags it inherited, and any of them may be set on the test's file system.
mount -o remount,bind,ro,nosuid,nodev,noexec "$cfg" || fail "read-only remount of $cfg"
# A tmpfs over /var/lib, so /var/lib/<name> can be made without writing to the host.
mount -t tmpfs -o mode=0755 tmpfs /var/lib || fail "tmpfs on /var/lib"
mkdir "/var/lib/$name" && mount --bind "$state" "/var/lib/$name" \
  || fail "bind mount of $state on /var/lib/$name"
exec unshare --user --map-user="$uid" --map-group="$uid" "$@"
"""


def _unshare() -> str:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare is not on PATH: these tests run the generated unit's "
                    "commands in namespaces (install util-linux)", pytrace=False)
    return unshare


def as_unit(command: list[str], config_dir: Path, state_dir: Path,
            state_name: str) -> list[str]:
    """The argv that runs ``command`` as the unit would; see the module's docstring."""
    hidden = [p for p in (Path(sys.prefix), Path(sys.base_prefix), config_dir, state_dir)
              if p.resolve().is_relative_to("/var/lib")]
    if hidden:
        pytest.fail(f"{hidden[0]} is under /var/lib, which the unit's sandbox covers with "
                    "its own: run the tests from a Python and a TMPDIR elsewhere",
                    pytrace=False)
    return [_unshare(), "--user", "--map-root-user", "--mount", "--propagation",
            "private", "env", f"STATE_DIRECTORY=/var/lib/{state_name}", "sh", "-c",
            _SETUP, "sh", str(config_dir), str(state_dir), state_name, str(UID),
            str(SETUP_FAILED), *command]


def fail_if_no_sandbox(returncode: int | None, stderr: str) -> None:
    """A sandbox that could not be made fails the test, saying why (never a skip)."""
    if returncode == SETUP_FAILED or stderr.startswith("unshare: "):
        pytest.fail("cannot make the unit's sandbox (user and mount namespaces): run as "
                    "root or enable unprivileged user namespaces (sysctl "
                    f"kernel.unprivileged_userns_clone=1): {stderr}", pytrace=False)


def run_as_unit(command: list[str], config_dir: Path, state_dir: Path,
                state_name: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(as_unit(command, config_dir, state_dir, state_name),
                          capture_output=True, text=True, timeout=timeout, check=False)
    fail_if_no_sandbox(done.returncode, done.stderr)
    return done
