"""ftlab.cache: the hasher that names cache entries, folders built once, files written whole, JSON
values computed once under a lock, and damaged entries of both kinds found, reported and rebuilt."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ftlab.cache import (
    COMPLETE_MARKER,
    atomic_write_json,
    atomic_write_text,
    build_once,
    cached_json,
    fingerprint,
    folder_problem,
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


# -- verification: damaged entries are never trusted -----------------------------------------------

WEIGHTS = bytes(range(256)) * 64  # 16 KiB, like a small weights file


def _build_model(calls: list) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(WEIGHTS)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"layers": 2}')

    return build


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != COMPLETE_MARKER}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _old_marker(folder: Path) -> None:
    (folder / COMPLETE_MARKER).write_text(json.dumps({"built_at": 1.0}))  # what ftlab wrote before hashes


DAMAGE = {
    "truncated": (lambda f: _truncate(f / "weights.bin"), "weights.bin has 8192 bytes, but 16384 were written"),
    "same size, one byte changed": (lambda f: _flip_a_byte(f / "weights.bin"), "weights.bin does not match the sha256"),
    "a nested file changed": (lambda f: (f / "sub" / "config.json").write_text('{"layers": 3}'),
                              "sub/config.json does not match the sha256"),
    "a file removed": (lambda f: (f / "weights.bin").unlink(), "weights.bin is missing"),
    "marker removed": (lambda f: (f / COMPLETE_MARKER).unlink(), f"no completion marker {COMPLETE_MARKER}"),
    "marker cut short": (lambda f: _truncate(f / COMPLETE_MARKER), "is not valid JSON"),
    "marker of an older ftlab": (_old_marker, "older ftlab"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_build_once_rebuilds_a_damaged_folder_with_a_warning(tmp_path, damage, caplog):
    harm, reason = DAMAGE[damage]
    calls: list = []
    target = tmp_path / "model"
    build_once(target, _build_model(calls))
    fresh = _contents(target)
    harm(target)
    assert not is_complete(target)
    with caplog.at_level(logging.WARNING, logger="ftlab.cache"):
        assert build_once(target, _build_model(calls)) == target
    assert len(calls) == 2
    (record,) = [r for r in caplog.records if r.name == "ftlab.cache"]
    assert record.levelno == logging.WARNING
    assert str(target) in record.message and reason in record.message and "building it again" in record.message
    assert _contents(target) == fresh
    assert is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]  # nothing set aside is left


def test_an_untouched_folder_is_a_hit_and_says_nothing(tmp_path, caplog):
    calls: list = []
    target = tmp_path / "model"
    build_once(target, _build_model(calls))
    marker = json.loads((target / COMPLETE_MARKER).read_text())
    assert marker["files"] == {
        "sub/config.json": {"size": 13, "sha256": fingerprint(b'{"layers": 2}')},
        "weights.bin": {"size": len(WEIGHTS), "sha256": fingerprint(WEIGHTS)},
    }
    (target / "notes.txt").write_text("added later")  # not part of the entry: ignored
    with caplog.at_level(logging.DEBUG, logger="ftlab.cache"):
        for _ in range(2):
            build_once(target, _build_model(calls))
    assert len(calls) == 1 and caplog.records == []


def test_folders_are_hashed_once_per_process_until_a_file_changes(tmp_path, monkeypatch):
    import ftlab.cache

    target = tmp_path / "model"
    build_once(target, _build_model([]))
    hashed: list[str] = []
    real = ftlab.cache.file_sha256
    monkeypatch.setattr(ftlab.cache, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    assert folder_problem(target) is None and hashed == []  # its builder hashed it just now
    ftlab.cache._verified.clear()  # as in a new process
    assert folder_problem(target) is None and sorted(hashed) == ["config.json", "weights.bin"]
    assert folder_problem(target) is None and len(hashed) == 2  # sizes checked, not hashed again
    stat = (target / "weights.bin").stat()
    _flip_a_byte(target / "weights.bin")
    os.utime(target / "weights.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    assert "weights.bin does not match the sha256" in folder_problem(target)


def test_concurrent_callers_rebuild_a_damaged_folder_once(tmp_path, caplog):
    calls: list = []
    target = tmp_path / "model"
    build_once(target, _build_model(calls))
    _flip_a_byte(target / "weights.bin")

    def slow_build(tmp: Path) -> None:
        time.sleep(0.3)
        _build_model(calls)(tmp)

    with caplog.at_level(logging.WARNING, logger="ftlab.cache"):
        threads = [threading.Thread(target=build_once, args=(target, slow_build)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(calls) == 2 and (target / "weights.bin").read_bytes() == WEIGHTS
    assert len([r for r in caplog.records if "cannot be used" in r.message]) == 1


SAMPLES = [{"prompt": "p", "reference": "r", "prediction": "x", "correct": False}]


def _score_file(tmp_path: Path) -> tuple[Path, dict]:
    from ftlab.evaluation.generation import GenerationScore, base_score_cached

    key = {"checkpoint": "tiny-abc", "quantization": "none", "records": "sha:1", "checker": "exact"}
    score = GenerationScore(0.25, 1, 4, "exact", SAMPLES)
    base_score_cached(tmp_path, key, lambda: score)
    (path,) = (tmp_path / "base_eval").glob("*.json")
    return path, key


JSON_DAMAGE = {
    "truncated": (_truncate, "is not valid JSON"),
    "same size, a number changed": (lambda p: p.write_text(p.read_text().replace('"score": 0.25', '"score": 0.75')),
                                    "does not match the sha256 stored with it"),
    "written by an older ftlab": (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                                                     if k != "_ftlab_sha256"})), "no content hash"),
}


@pytest.mark.parametrize("damage", list(JSON_DAMAGE))
def test_a_damaged_cached_score_is_computed_again_with_a_warning(tmp_path, damage, caplog):
    from ftlab.evaluation.generation import GenerationScore, base_score_cached

    harm, reason = JSON_DAMAGE[damage]
    path, key = _score_file(tmp_path)
    fresh = path.read_text()
    size = path.stat().st_size
    harm(path)
    if damage.startswith("same size"):
        assert path.stat().st_size == size and json.loads(path.read_text())["score"]["score"] == 0.75
    calls = []

    def compute() -> GenerationScore:
        calls.append(1)
        return GenerationScore(0.25, 1, 4, "exact", SAMPLES)

    with caplog.at_level(logging.WARNING, logger="ftlab.cache"):
        score, hit = base_score_cached(tmp_path, key, compute)
    assert (hit, len(calls), score.score) == (False, 1, 0.25)
    (record,) = caplog.records
    assert str(path) in record.message and reason in record.message and "computing it again" in record.message
    assert path.read_text() == fresh
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftlab.cache"):  # control: now whole, a hit
        assert base_score_cached(tmp_path, key, compute) == (score, True)
    assert len(calls) == 1 and caplog.records == []


def test_cached_json_stores_the_hash_beside_the_value(tmp_path):
    path = tmp_path / "k.json"
    cached_json(path, lambda: {"score": 0.5}, dict)
    stored = json.loads(path.read_text())
    assert stored == {"score": 0.5, "_ftlab_sha256": fingerprint({"score": 0.5}, strict=False)}
    with pytest.raises(TypeError, match="JSON object"):
        cached_json(tmp_path / "list.json", lambda: [1, 2], list)
    assert not (tmp_path / "list.json").exists()
