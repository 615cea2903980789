"""One process trains into a run (or sweep) folder at a time.

Two ``resume=true`` sweeps started on the same folder would otherwise both train the same jobs
into the same folders. ``hold_folder`` takes an exclusive lock (``filelock``: an OS lock the
kernel drops when the process dies, so a killed run never leaves its folder locked) and writes who
holds it beside it; a second process gets a ``FolderBusyError`` naming that process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ftlab.errors import FolderBusyError

__all__ = ["LOCK_FILE", "OWNER_FILE", "hold_folder", "is_held"]

LOCK_FILE = ".ftlab.lock"
OWNER_FILE = ".ftlab.owner.json"  # who holds the lock: pid, host, since, command


def _owner(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["since"])))
        return f"pid {owner['pid']} on {owner['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def hold_folder(folder: Path, what: str = "run") -> Iterator[None]:
    """Hold ``folder``'s lock for the block, or raise ``FolderBusyError`` at once if it is held."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderBusyError(
            f"{folder}: another ftlab process is training into this {what} folder ({_owner(folder)}); "
            f"wait for it to end, or train into another folder") from None
    try:
        (folder / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                     "since": time.time(), "command": sys.argv}))
        yield
    finally:
        (folder / OWNER_FILE).unlink(missing_ok=True)
        lock.release()


def is_held(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock now (a record saying ``running`` in a folder
    nobody holds belongs to a run that was killed)."""
    from filelock import FileLock, Timeout

    path = Path(folder) / LOCK_FILE
    if not path.exists():
        return False
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False
