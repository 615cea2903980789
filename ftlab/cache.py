"""Everything ftlab keeps on disk between runs goes through here: cache keys, folders built once,
and files written whole.

Why one module: converted and tiny model folders (``ftlab.models.gguf``, ``ftlab.models.tiny``),
tokenized data (``ftlab.data.cache``), the base model's score (``ftlab.evaluation.generation``)
and the run record (``ftlab.results``) are shared by DDP ranks and the parallel jobs of a sweep,
and a crash must never leave a half-written entry that a later run trusts. Each of them needs
the same three things:

* ``fingerprint`` -- the one hasher: a stable key for a payload (sha256 of canonical JSON, or
  of raw bytes);
* ``build_once`` -- a cache *folder* built in a temporary sibling and moved into place under a
  file lock, with a marker written last (``is_complete``);
* ``atomic_write_text``/``atomic_write_json`` -- a *file* written to a temporary file in the
  same folder and ``os.replace``-d in; ``cached_json`` adds the file lock, so a value is
  computed by one process while the others wait and read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "COMPLETE_MARKER", "atomic_write_json", "atomic_write_text", "build_once", "cached_json", "fingerprint",
    "is_complete",
]

COMPLETE_MARKER = ".ftlab-complete"  # written last, so a folder holding it is whole

T = TypeVar("T")


# -- keys ------------------------------------------------------------------------------------------


def fingerprint(payload: Any, length: int | None = None, *, strict: bool = True) -> str:
    """sha256 hex of ``payload``, cut to its first ``length`` characters: equal payloads give
    equal prints in every process and run, so the print can name a cache entry.

    ``bytes`` (a file's content) are hashed as they are; anything else as canonical JSON (sorted
    keys). ``strict`` accepts JSON types only (no NaN), so nothing whose text changes between
    runs, such as an object's default repr, can slip into a key. ``strict=False`` writes other
    values as their ``str()`` in ``json.dumps``' default spacing: the text the model-folder names
    and base-score files were always keyed with, kept byte for byte so those caches stay valid.
    """
    if isinstance(payload, bytes):
        data = payload
    elif strict:
        data = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    else:
        data = json.dumps(payload, sort_keys=True, default=str).encode()
    digest = hashlib.sha256(data).hexdigest()
    return digest if length is None else digest[:length]


# -- folders ---------------------------------------------------------------------------------------


def is_complete(folder: Path) -> bool:
    """A cache folder is usable only once its builder finished (marker written last)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target``, unless ``target`` is complete.

    A ``FileLock`` next to the target serialises concurrent processes: the first one builds, the
    others wait and then find the folder complete. Building in a temporary sibling folder and
    ``os.replace``-ing it in means a crash never leaves a half-written ``target`` behind.
    """
    from filelock import FileLock

    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            build(tmp)
            for file in tmp.rglob("*"):  # some writers create owner-only files
                file.chmod(0o755 if file.is_dir() else 0o644)
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"built_at": time.time()}))
            if target.exists():  # a folder without our marker: not ours to trust
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- files -----------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` whole or not at all: a crash (or an error) mid-write leaves the
    old file, if any, untouched and no temporary file behind.

    The temporary file sits in the same folder, so ``os.replace`` is a rename on one filesystem,
    which readers see happen at once. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; run folders and the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, obj: Any) -> Path:
    """``obj`` as indented JSON (one trailing newline), written with ``atomic_write_text``."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _stored(path: Path, parse: Callable[[Any], T]) -> list[T]:
    """``[value]`` when ``path`` holds JSON that ``parse`` accepts, else ``[]``."""
    try:
        return [parse(json.loads(path.read_text(encoding="utf-8")))]
    except (OSError, ValueError, KeyError, TypeError):  # missing, edited by hand, or an older layout
        return []


def cached_json(path: Path, compute: Callable[[], Any], parse: Callable[[Any], T]) -> tuple[T, bool]:
    """``parse`` of the JSON stored at ``path``, computed by ``compute()`` and stored first when
    missing; returns ``(value, hit)``.

    A ``FileLock`` next to the file lets one process compute while parallel ones wait and then
    read its result, instead of all computing. A stored value that ``parse`` rejects (``KeyError``,
    ``TypeError``, ``ValueError``: an older layout) is computed and written again. Values JSON cannot
    hold are stored as their ``str()``, and a fresh value is parsed from the text just written, so
    a hit and a miss return the same thing.
    """
    from filelock import FileLock

    path = Path(path)
    if stored := _stored(path, parse):
        return stored[0], True
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if stored := _stored(path, parse):  # another process wrote it while we waited
            return stored[0], True
        text = json.dumps(compute(), indent=2, sort_keys=True, default=str) + "\n"
        atomic_write_text(path, text)
    return parse(json.loads(text)), False
