"""Everything ftlab keeps on disk between runs goes through here: cache keys, folders built once,
files written whole, and the check that what is read back is what was written.

Why one module: converted and tiny model folders (``ftlab.models.gguf``, ``ftlab.models.tiny``),
tokenized data (``ftlab.data.cache``), the base model's score (``ftlab.evaluation.generation``)
and the run record (``ftlab.results``) are shared by DDP ranks and the parallel jobs of a sweep,
and a crash must never leave a half-written entry that a later run trusts. Each of them needs
the same things:

* ``fingerprint`` -- the one hasher: a stable key for a payload (sha256 of canonical JSON, or
  of raw bytes);
* ``build_once`` -- a cache *folder* built in a temporary sibling and moved into place under a
  file lock, with a marker written last that records the size and sha256 of every file in it;
* ``atomic_write`` (and ``atomic_write_text``/``atomic_write_json``) -- a *file* written to a temporary file in the
  same folder and ``os.replace``-d in; ``cached_json`` adds the file lock, so a value is
  computed by one process while the others wait and read it, and stores the sha256 of the
  value in the same file.

Entries are verified when read (``folder_problem``, ``cached_json``): a missing or cut file, a
changed byte, a marker that is missing or unreadable, a JSON file that does not parse or does not
match its hash. Such an entry is never used: a warning names its path and what is wrong, it is
removed and built again. Entries of an older ftlab (a marker without hashes, a JSON value without
one) cannot be verified and are built again once, with the same warning.

What verifying costs: sizes are checked on every read (one ``stat`` per file); the sha256 of every
file once per process and entry, then again only when a file's ``stat`` changes (size, mtime,
ctime, inode). sha256 runs at 0.8-1.5 GB/s here (SHA-NI; measured 0.37-0.65 s for the 538 MB
SmolLM2 folder, under 1 ms for the tiny model, 0.2 ms for a folder already hashed by this
process), less than SmolLM2's first ``from_pretrained`` (about 2 s) and a run's start-up; only a
full hash finds a byte changed in place, so hashing only sizes or only small files was not worth
the saving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

__all__ = [
    "COMPLETE_MARKER", "atomic_write", "atomic_write_json", "atomic_write_text", "build_once", "cached_json", "file_sha256",
    "fingerprint", "folder_problem", "is_complete",
]

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".ftlab-complete"  # written last, so a folder holding it is whole; lists every file's hash
MARKER_FORMAT = 2  # 1 (and none): no hashes, from an older ftlab
HASH_KEY = "_ftlab_sha256"  # in a ``cached_json`` file: the sha256 of the value stored beside it

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


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes, read in chunks (a model's weights need not fit in memory twice)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -- folders ---------------------------------------------------------------------------------------

# folder -> the stat of its marker and files when this process last hashed them all and found them
# as built: an unchanged stat is not hashed again (see the module docstring for the cost).
_verified: dict[str, dict[str, tuple[int, int, int, int]]] = {}


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``folder`` but the marker."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}


def _listed_files(marker_text: str) -> dict[str, dict[str, Any]] | str:
    """The files a marker lists, or what is wrong with it."""
    try:
        info = json.loads(marker_text)
    except ValueError as e:
        return f"its completion marker {COMPLETE_MARKER} is not valid JSON ({e})"
    if not isinstance(info, dict) or "files" not in info:
        return "it was built by an older ftlab, whose completion marker records no content hashes"
    files = info["files"]
    if not isinstance(files, dict) or not all(
        isinstance(rel, str) and rel and not PurePosixPath(rel).is_absolute() and ".." not in PurePosixPath(rel).parts
        and isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for rel, v in files.items()
    ):
        return f"its completion marker {COMPLETE_MARKER} does not list files as {{path: {{size, sha256}}}}"
    return files


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def folder_problem(folder: Path) -> str | None:
    """None when ``folder`` is a cache folder as ``build_once`` built it; else what is wrong
    (it does not exist, its marker is missing or unreadable, a file it lists is missing or has
    another size or sha256). Files added to the folder later are not part of the entry."""
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not folder.is_dir():
        return "it does not exist" if not os.path.lexists(folder) else "it is not a folder"
    try:
        marker_stat = marker.stat()
        text = marker.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"it has no completion marker {COMPLETE_MARKER}: its build never finished"
    except (OSError, UnicodeDecodeError) as e:
        return f"its completion marker {COMPLETE_MARKER} cannot be read ({e})"
    files = _listed_files(text)
    if isinstance(files, str):
        return files
    stats = {COMPLETE_MARKER: _stat_key(marker_stat)}
    for rel, want in files.items():
        try:
            st = (folder / rel).stat()
        except FileNotFoundError:
            return f"{rel} is missing"
        except OSError as e:
            return f"{rel} cannot be read ({e})"
        if st.st_size != want["size"]:
            return f"{rel} has {st.st_size} bytes, but {want['size']} were written"
        stats[rel] = _stat_key(st)
    key = os.path.abspath(folder)
    if _verified.get(key) == stats:
        return None
    for rel, want in files.items():
        try:
            digest = file_sha256(folder / rel)
        except OSError as e:
            return f"{rel} cannot be read ({e})"
        if digest != want["sha256"]:
            return f"{rel} does not match the sha256 recorded when it was built (its content changed)"
    _verified[key] = stats
    return None


def _remember(folder: Path, files: Mapping[str, Any]) -> None:
    """Record a folder whose files were just hashed by its builder, so this process does not hash
    them again before it reads them."""
    stats = {rel: _stat_key((folder / rel).stat()) for rel in [COMPLETE_MARKER, *files]}
    _verified[os.path.abspath(folder)] = stats


def is_complete(folder: Path) -> bool:
    """A cache folder is usable only once its builder finished (marker written last) and every
    file it lists is still as written (``folder_problem``)."""
    return folder_problem(folder) is None


def _discard(path: Path) -> None:
    """Remove ``path`` (a folder or a file): first renamed aside in one step, so nobody sees it half
    deleted, then deleted."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.discarded-", dir=path.parent))
    os.replace(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target``, unless ``target`` is complete.

    A ``FileLock`` next to the target serialises concurrent processes: the first one builds, the
    others wait and then find the folder complete. Building in a temporary sibling folder and
    ``os.replace``-ing it in means a crash never leaves a half-written ``target`` behind. The
    marker, written last, records every file's size and sha256; a ``target`` that does not match
    it (``folder_problem``) is logged as a warning with its path and what is wrong, removed and
    built again.
    """
    from filelock import FileLock

    target = Path(target)
    if folder_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        problem = folder_problem(target)  # another process may have built it while we waited
        if problem is None:
            return target
        if os.path.lexists(target):
            log.warning("cache entry %s cannot be used: %s; removing it and building it again", target, problem)
            _discard(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            build(tmp)
            for file in tmp.rglob("*"):  # some writers create owner-only files
                file.chmod(0o755 if file.is_dir() else 0o644)
            marker = {"format": MARKER_FORMAT, "built_at": time.time(), "files": _manifest(tmp)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True), encoding="utf-8")
            if os.path.lexists(target):  # appeared without the lock: not ours to trust
                _discard(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _remember(target, marker["files"])
    return target


# -- files -----------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file in the same folder,
    which is flushed to disk and renamed over ``path``; a crash (or an error) mid-write leaves the
    old file, if any, untouched and no temporary file behind.

    The temporary file sits in the same folder, so ``os.replace`` is a rename on one filesystem,
    which readers see happen at once. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; run folders and the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """``text`` (UTF-8) written with ``atomic_write``."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """``obj`` as indented JSON (one trailing newline), written with ``atomic_write_text``."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _value_sha256(value: dict[str, Any]) -> str:
    """The hash stored beside a ``cached_json`` value: of its canonical JSON, so it does not depend
    on the file's spacing or key order."""
    return fingerprint(value, strict=False)


def _stored(path: Path, parse: Callable[[Any], T]) -> tuple[list[T], str | None]:
    """``([value], None)`` when ``path`` holds a value with its matching hash that ``parse``
    accepts; ``([], None)`` when there is no file; ``([], what is wrong)`` otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], None
    except (OSError, UnicodeDecodeError) as e:
        return [], f"it cannot be read ({e})"
    try:
        stored = json.loads(text)
    except ValueError as e:
        return [], f"it is not valid JSON ({e})"
    if not isinstance(stored, dict) or HASH_KEY not in stored:
        return [], "it has no content hash (written by an older ftlab)"
    digest = stored.pop(HASH_KEY)
    if digest != _value_sha256(stored):
        return [], "its content does not match the sha256 stored with it (it changed after it was written)"
    try:
        return [parse(stored)], None
    except (KeyError, TypeError, ValueError) as e:  # a value of an older layout
        return [], f"it does not hold what this ftlab reads ({type(e).__name__}: {e})"


def cached_json(path: Path, compute: Callable[[], Mapping[str, Any]], parse: Callable[[Any], T]) -> tuple[T, bool]:
    """``parse`` of the JSON object stored at ``path``, computed by ``compute()`` and stored first
    when missing; returns ``(value, hit)``.

    A ``FileLock`` next to the file lets one process compute while parallel ones wait and then
    read its result, instead of all computing. The file holds the object and, under the key
    ``HASH_KEY``, the sha256 of the rest, written in one ``atomic_write_text``. A stored file that
    does not parse, has no hash or another one, or holds a value ``parse`` rejects (``KeyError``,
    ``TypeError``, ``ValueError``: an older layout) is logged as a warning naming it and why,
    removed, and computed again. Values JSON cannot hold are stored as their ``str()``, and a fresh
    value is parsed from what was written, so a hit and a miss return the same thing.
    """
    from filelock import FileLock

    path = Path(path)
    stored, _ = _stored(path, parse)
    if stored:
        return stored[0], True
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        stored, problem = _stored(path, parse)  # another process may have written it while we waited
        if stored:
            return stored[0], True
        if problem is not None:
            log.warning("cache file %s cannot be used: %s; removing it and computing it again", path, problem)
            path.unlink(missing_ok=True)
        computed = compute()
        if not isinstance(computed, Mapping):
            raise TypeError(f"cached_json stores a JSON object; compute() returned {type(computed).__name__}")
        if HASH_KEY in computed:
            raise ValueError(f"cached_json keeps the key {HASH_KEY!r} for the value's hash; compute() returned one")
        value = json.loads(json.dumps(computed, default=str))  # what a later hit reads
        atomic_write_text(path, json.dumps({**value, HASH_KEY: _value_sha256(value)}, indent=2, sort_keys=True) + "\n")
    return parse(value), False
