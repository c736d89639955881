"""Where the SQLite usage ledger lives, and whether this process can keep it there.

``corral serve`` opens the file it names and ``corral check`` asks :func:`problem`
about the same file, so a check run as the service's user, in the service's sandbox
(a unit's ``ExecStartPre``), fails exactly when the service would.
"""

from __future__ import annotations

import errno
import os
import pwd
from collections.abc import Mapping
from pathlib import Path
from typing import Final

DEFAULT_FILE: Final = "corral-usage.sqlite3"


def ledger_file(configured: str | None, config_path: str | Path | None,
                environ: Mapping[str, str] | None = None) -> Path:
    """``usage.path`` when set; else ``corral-usage.sqlite3`` in ``$STATE_DIRECTORY``
    (what systemd's ``StateDirectory=`` gives a unit, and what the container image
    sets): the configuration's directory is often read-only to the service
    (``ProtectSystem=strict``, a ``:ro`` mount); else beside the configuration file,
    else in the working directory."""
    if configured is not None:
        return Path(configured)
    env = os.environ if environ is None else environ
    # systemd lists one directory per StateDirectory= entry, colon-separated.
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / DEFAULT_FILE
    base = Path(config_path).resolve().parent if config_path else Path.cwd()
    return base / DEFAULT_FILE


def _who() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:            # a uid without a passwd entry (DynamicUser=, containers)
        return f"uid {os.getuid()}"


def _denied(path: Path) -> str:
    read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    return os.strerror(errno.EROFS if read_only else errno.EACCES)


def problem(path: Path) -> str | None:
    """Why this process could not keep a SQLite ledger at ``path``, or None; nothing
    is created. SQLite writes its journal (``-wal``, ``-shm``) beside the file, so
    the directory must be writable too, and a missing directory is made by the store,
    so the nearest existing one must be."""
    who = _who()
    if path.is_dir():
        return f"{path} is a directory, not a file"
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} cannot be written by {who}: {_denied(path)}"
        directory = path.parent
    else:
        directory = path.parent
        while not directory.exists() and directory != directory.parent:
            directory = directory.parent
        if not directory.is_dir():
            return f"{directory} is not a directory, so {path} cannot be made"
    if not os.access(directory, os.W_OK | os.X_OK):
        return (f"{path} cannot be written by {who}: its directory {directory}: "
                f"{_denied(directory)}")
    return None
