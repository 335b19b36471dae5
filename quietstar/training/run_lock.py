"""The owner of a run folder: ``<run>/.quietstar.lock``, taken before a run writes anything there
and released when it ends (also after an error or Ctrl-C), so two runs never write into one folder.

The lock file is created with O_CREAT | O_EXCL, so only one process can create it, and holds
JSON: the owner's pid, host, start time and a token of its own. While the owner lives another
run is refused (same host: ``os.kill(pid, 0)``, and on Linux the process's start time, so that
a reused pid does not count); a lock whose process is gone is taken over (``RunLock.taken_over``:
the caller logs it). A lock written on another host cannot be checked from here: it is refused,
with how to take it over by hand. Only the main process of a distributed run takes it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quietstar.utils.errors import QuietStarInputError

LOCK_NAME = ".quietstar.lock"
TAKEOVER_NAME = LOCK_NAME + ".takeover"  # held (O_EXCL) while a dead owner's lock is removed
WAIT_S = 2.0  # a lock file still empty (its owner is writing it) is waited for this long
STALE_TAKEOVER_S = 10.0  # a takeover file this old was left by a process that died mid-takeover


class RunFolderInUse(QuietStarInputError):
    """Another run holds the folder's lock."""


@dataclass
class RunLock:
    """A held lock: ``release()`` deletes the file if it is still this process's."""

    path: Path
    owner: dict[str, Any]
    taken_over: dict[str, Any] | None = None  # the dead owner whose lock this one replaced

    def release(self) -> None:
        if read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def acquire(run_dir: str | Path) -> RunLock:
    """Takes the lock of the (existing) folder ``run_dir``; RunFolderInUse while another run
    holds it. OSError where the folder cannot be written."""
    path = Path(run_dir) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": process_start(os.getpid()),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
    deadline, taken_over = time.monotonic() + WAIT_S, None
    while True:
        if _create(path, me):
            return RunLock(path, me, taken_over)
        owner = read_owner(path)
        if owner is None:  # released meanwhile (try again), or being written by its owner
            if path.exists() and time.monotonic() > deadline:
                raise RunFolderInUse(f"{run_dir} has a lock file {path} that cannot be read (damaged?); "
                                     "if no quietstar train is using this folder, delete it and "
                                     "start again, or choose another --output-dir")
            time.sleep(0.05)
            continue
        alive = owner_alive(owner)
        if alive is None or alive:
            raise RunFolderInUse(_in_use(run_dir, path, owner, checked=alive is not None))
        if _remove_stale(path, owner):
            taken_over = owner
        elif time.monotonic() > deadline + STALE_TAKEOVER_S:
            raise RunFolderInUse(f"{run_dir}: another process is taking over its lock {path}; "
                                 "try again")
        else:
            time.sleep(0.05)


def _in_use(run_dir, path: Path, owner: dict[str, Any], checked: bool) -> str:
    who = f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
    if checked:
        return (f"{run_dir} is in use by another quietstar train ({who}, still running); wait for "
                "it to end or stop it, or choose another --output-dir")
    return (f"{run_dir} is in use by another quietstar train ({who}), which cannot be checked "
            f"from here; if that run is no longer running, delete {path} and start again, "
            "or choose another --output-dir")


def read_owner(path: Path) -> dict[str, Any] | None:
    """The lock file's owner; None where there is none or it is not one (yet: being written)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, a folder, unreadable; UnicodeDecodeError is a ValueError
        return None
    if not isinstance(owner, dict) or type(owner.get("pid")) is not int or not isinstance(owner.get("host"), str):
        return None
    return owner


def owner_alive(owner: dict[str, Any]) -> bool | None:
    """Whether the lock's process still runs; None where this host cannot tell (another host,
    or Windows, where ``os.kill(pid, 0)`` would send the process a Ctrl-C)."""
    if owner.get("host") != socket.gethostname() or os.name == "nt":
        return None
    pid = owner["pid"]
    if pid <= 0:
        return False  # no process: kill would signal a whole group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = owner.get("process_start")
    return started is None or process_start(pid) in (None, started)  # a reused pid is another process


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (Linux); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return None


def _create(path: Path, owner: dict[str, Any]) -> bool:
    """Creates the lock file holding ``owner``; False where it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(owner) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _remove_stale(path: Path, owner: dict[str, Any]) -> bool:
    """Deletes the lock of dead ``owner`` if it is still that one; False while another process
    is doing so. The takeover file makes "read, still the dead owner's, delete" one step, so a
    fresh lock taken meanwhile is never the one deleted."""
    guard = path.with_name(TAKEOVER_NAME)
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > STALE_TAKEOVER_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False
    try:
        if read_owner(path) == owner:
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)
    return True
