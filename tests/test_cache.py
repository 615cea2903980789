"""ftlab.cache: the hasher that names cache entries, folders built once, files written whole, and
JSON values computed once under a lock."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ftlab.cache import (
    COMPLETE_MARKER,
    atomic_write_json,
    atomic_write_text,
    build_once,
    cached_json,
    fingerprint,
    is_complete,
)

# -- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_is_the_same_for_equal_payloads():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})  # key order is no input
    assert fingerprint({"a": 1}, strict=False) == fingerprint({"a": 1}, strict=False)
    assert fingerprint(b"weights") == fingerprint("weights".encode())


def test_fingerprint_differs_for_different_payloads():
    payloads = [{"a": 1}, {"a": 2}, {"a": "1"}, {"a": [1, 2]}, {"a": [2, 1]}, {"b": 1}, [1], b"a", b"b"]
    assert len({fingerprint(p) for p in payloads}) == len(payloads)
    assert fingerprint({"a": 1}) != fingerprint({"a": 1}, strict=False)  # two texts, two prints


def test_fingerprint_values_are_pinned():
    """Cache folders and files on users' disks are named by these: a change orphans them all."""
    payload = {"a": [1, "é"]}
    assert fingerprint(payload) == "5db14a2cddc92d31365806bb5d82ed2bc436bf6960d10cd4654140f7bdadce1c"
    assert fingerprint(payload, strict=False) == "9581baeec64bddcc16d6b51a0e4f0c84335fd5ff228f0c85ea08e765a99fa1ca"
    assert fingerprint(payload, 12) == "5db14a2cddc9"
    assert fingerprint(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


def test_fingerprint_is_the_same_in_another_process():
    code = "from ftlab.cache import fingerprint; print(fingerprint({'x': {'b': 2, 'a': [1.5, None]}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == fingerprint({"x": {"a": [1.5, None], "b": 2}})


def test_strict_fingerprint_takes_json_only():
    for bad in ({"a": object()}, {"a": Path("x")}, {"a": float("nan")}):
        with pytest.raises((TypeError, ValueError)):
            fingerprint(bad)
    assert fingerprint({"a": Path("x")}, strict=False) == fingerprint({"a": "x"}, strict=False)


# -- build_once ------------------------------------------------------------------------------------


def test_build_once_builds_once_across_concurrent_callers(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        time.sleep(0.3)  # a slow conversion: the others must wait, not start their own
        (tmp / "weights.bin").write_text("w")

    target = tmp_path / "model"
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_once(target, build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target] * 3
    assert (target / "weights.bin").read_text() == "w" and (target / COMPLETE_MARKER).is_file()
    assert is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]  # no temp left
    build_once(target, lambda tmp: pytest.fail("rebuilt a complete folder"))


def test_build_once_leaves_nothing_half_written(tmp_path):
    def broken(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, broken)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.lock"]


def test_build_once_replaces_a_folder_without_the_marker(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.bin").write_text("half")  # a folder some crash or older tool left behind
    assert not is_complete(target)
    build_once(target, lambda tmp: (tmp / "weights.bin").write_text("w"))
    assert sorted(p.name for p in target.iterdir()) == [COMPLETE_MARKER, "weights.bin"]


# -- atomic writes ---------------------------------------------------------------------------------


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "record.json"
    assert atomic_write_json(path, {"b": 1, "a": [1.5, None]}) == path  # parent folders made
    assert json.loads(path.read_text()) == {"b": 1, "a": [1.5, None]}
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, like a plain write
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


def test_failed_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, '{"old": true}\n')
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, '{"new": "' + "x" * 100_000 + '\ud800"}')  # fails part-way through writing
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_failed_sync_leaves_the_old_file_intact(tmp_path, monkeypatch):
    import ftlab.cache

    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"old": True})

    def no_space(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ftlab.cache.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        atomic_write_json(path, {"new": True})
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# -- cached_json -----------------------------------------------------------------------------------


def test_cached_json_computes_once_across_concurrent_callers(tmp_path):
    calls = []

    def compute() -> dict:
        calls.append(1)
        time.sleep(0.3)  # the others must wait for this one, not compute their own
        return {"score": 0.5, "where": Path("/x")}

    path = tmp_path / "scores" / "k.json"
    results = []
    threads = [threading.Thread(target=lambda: results.append(cached_json(path, compute, dict))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(hit for _, hit in results) == [False, True, True]
    assert all(value == {"score": 0.5, "where": "/x"} for value, _ in results)  # a miss returns what a hit reads
    assert cached_json(path, lambda: pytest.fail("computed again"), dict) == ({"score": 0.5, "where": "/x"}, True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["k.json", "k.json.lock"]


def test_cached_json_recomputes_what_parse_rejects(tmp_path):
    path = tmp_path / "k.json"
    path.write_text('{"old_layout": 1}')

    def parse(stored: dict) -> int:
        return stored["value"]

    assert cached_json(path, lambda: {"value": 7}, parse) == (7, False)
    assert cached_json(path, lambda: {"value": 8}, parse) == (7, True)
    path.write_text('{"value": ')  # cut short by hand
    assert cached_json(path, lambda: {"value": 9}, parse) == (9, False)


def test_cached_json_stores_nothing_when_compute_fails(tmp_path):
    path = tmp_path / "k.json"

    def broken() -> dict:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cached_json(path, broken, dict)
    assert not path.exists()
    assert cached_json(path, lambda: {"v": 1}, dict) == ({"v": 1}, False)
