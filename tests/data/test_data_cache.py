"""The tokenized-data cache: hits skip tokenizing, every input of the tokens is in the key,
failed builds leave nothing behind, and stored examples come back exactly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ftlab.cache import COMPLETE_MARKER, fingerprint
from ftlab.data.cache import cached_examples, rows_fingerprint, tokenizer_fingerprint
from ftlab.data.chat_masking import encode_chat
from ftlab.data.synthetic import default_splits
from ftlab.models.loading import load_tokenizer
from ftlab.models.tiny import TINY_TOKENIZER_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return default_splits(20, 0, 0)[0]


def key_for(records, tokenizer, max_length: int = 256, template: str = "chat") -> dict:
    return {
        "data": fingerprint(records),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": template,
        "settings": {"max_length": max_length},
    }


class Builder:
    """Counts calls, so a test can tell a cache hit from a rebuild."""

    def __init__(self, tokenizer, records, max_length: int = 256) -> None:
        self.calls = 0
        self.tokenizer, self.records, self.max_length = tokenizer, records, max_length

    def __call__(self) -> list[dict]:
        self.calls += 1
        return [encode_chat(self.tokenizer, r["messages"], self.max_length) for r in self.records]


def entries(cache_dir: Path) -> list[Path]:
    folder = cache_dir / "tokenized"
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


def test_second_call_is_a_hit(tmp_path, tokenizer, records, caplog):
    build = Builder(tokenizer, records)
    key = key_for(records, tokenizer)
    with caplog.at_level(logging.INFO, logger="ftlab.data.cache"):
        first, hit1 = cached_examples(tmp_path, key, build, "train")
        second, hit2 = cached_examples(tmp_path, key, build, "train")
    assert (hit1, hit2) == (False, True)
    assert build.calls == 1
    assert second == first == Builder(tokenizer, records)()
    (entry,) = entries(tmp_path)
    assert entry.name.startswith("train-") and len(entry.name) == len("train-") + 16
    assert json.loads((entry / "key.json").read_text()) == {"label": "train", "key": key}
    assert f"tokenizing {len(records)} examples (cached to {entry})" in caplog.text
    assert "cache hit" in caplog.text and str(entry) in caplog.text


def test_every_input_changes_the_key(tmp_path, tokenizer, records):
    other_tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    other_tokenizer.chat_template = tokenizer.chat_template.replace("\n", "\n\n")
    base = key_for(records, tokenizer)
    variants = [
        key_for(records[:-1], tokenizer),
        key_for(records, other_tokenizer),
        key_for(records, tokenizer, template="alpaca"),
        key_for(records, tokenizer, max_length=128),
    ]
    prints = {fingerprint(base), *map(fingerprint, variants)}
    assert len(prints) == 5
    build = Builder(tokenizer, records)
    for key in [base, *variants]:
        assert cached_examples(tmp_path, key, build, "train")[1] is False
    assert build.calls == 5 and len(entries(tmp_path)) == 5


def test_rows_fingerprint_ignores_private_fields(records):
    annotated = [{**r, "_line": i} for i, r in enumerate(records)]
    assert rows_fingerprint(annotated) == rows_fingerprint(records) == fingerprint(records)
    assert rows_fingerprint(records[:-1]) != rows_fingerprint(records)


def test_tokenizer_fingerprint(tokenizer):
    same = load_tokenizer(TINY_TOKENIZER_DIR)
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(tokenizer)
    same.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer_fingerprint(same) != tokenizer_fingerprint(tokenizer)
    extra = load_tokenizer(TINY_TOKENIZER_DIR)
    extra.add_tokens(["<|new|>"])
    assert tokenizer_fingerprint(extra) != tokenizer_fingerprint(tokenizer)


def test_failed_build_leaves_no_entry(tmp_path, tokenizer, records):
    key = key_for(records, tokenizer)

    def broken() -> list[dict]:
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        cached_examples(tmp_path, key, broken, "train")
    assert entries(tmp_path) == []  # neither the entry nor its temporary folder
    build = Builder(tokenizer, records)
    examples, hit = cached_examples(tmp_path, key, build, "train")
    assert not hit and build.calls == 1 and len(examples) == len(records)
    assert (entries(tmp_path)[0] / COMPLETE_MARKER).is_file()


def test_int_fields_round_trip_exactly(tmp_path):
    examples = [
        {"input_ids": [5, 2**40, 0], "labels": [-100, 7, -100], "label": 3, "task": -1},
        {"input_ids": [], "labels": [], "label": 0, "task": 2**62},
        {"input_ids": [1], "labels": [1], "label": -5, "task": 0},
    ]
    cached_examples(tmp_path, {"k": 1}, lambda: examples, "cls")
    loaded, hit = cached_examples(tmp_path, {"k": 1}, lambda: pytest.fail("rebuilt"), "cls")
    assert hit and loaded == examples
    assert [list(ex) for ex in loaded] == [list(ex) for ex in examples]  # field order kept
    assert all(type(ex["label"]) is int and type(ex["input_ids"]) is list for ex in loaded)
    assert cached_examples(tmp_path, {"k": 2}, lambda: [], "empty")[0] == []


def test_refuses_what_it_cannot_store_exactly(tmp_path):
    with pytest.raises(TypeError, match="'text'"):
        cached_examples(tmp_path, {"k": 1}, lambda: [{"input_ids": [1], "text": "hi"}], "bad")
    with pytest.raises(ValueError, match="plain file name"):
        cached_examples(tmp_path, {"k": 1}, lambda: [], "../escape")
    assert entries(tmp_path) == []


def test_2000_examples_round_trip(tmp_path, tokenizer):
    records = default_splits(2000, 0, 0)[0]
    examples = [encode_chat(tokenizer, r["messages"], 256) for r in records]
    cached_examples(tmp_path, {"n": 2000}, lambda: examples, "train")
    loaded, hit = cached_examples(tmp_path, {"n": 2000}, lambda: pytest.fail("rebuilt"), "train")
    assert hit and loaded == examples


# -- damaged entries ---------------------------------------------------------------------------------


def _first_token_offset(path: Path) -> int:
    """Where the first token id (int64, little-endian) of ``input_ids`` lies in a safetensors file."""
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_size])
    return 8 + header_size + header["input_ids.values"]["data_offsets"][0]


def _change_first_token_id(path: Path) -> None:
    """Overwrite one token id in place: same size, still a valid file, other data."""
    data = bytearray(path.read_bytes())
    at = _first_token_offset(path)
    token = int.from_bytes(data[at : at + 8], "little", signed=True)
    data[at : at + 8] = (token + 1).to_bytes(8, "little", signed=True)
    path.write_bytes(bytes(data))


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "a token id changed"])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, tokenizer, records, caplog, damage):
    from ftlab.data.cache import load_examples

    build = Builder(tokenizer, records)
    key = key_for(records, tokenizer)
    fresh, _ = cached_examples(tmp_path, key, build, "train")
    (entry,) = entries(tmp_path)
    data = entry / "examples.safetensors"
    size = data.stat().st_size
    if damage == "truncated":
        _cut_in_half(data)
    else:
        _change_first_token_id(data)
        assert data.stat().st_size == size
        tampered = load_examples(data)  # what a run without the check would silently train on
        assert tampered[0]["input_ids"][0] == fresh[0]["input_ids"][0] + 1 and tampered[1:] == fresh[1:]
    with caplog.at_level(logging.WARNING):
        examples, hit = cached_examples(tmp_path, key, build, "train")
    assert (hit, build.calls) == (False, 2)
    assert examples == fresh == Builder(tokenizer, records)()
    warnings = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0] and "examples.safetensors" in warnings[0]
    assert ("has" in warnings[0] and f"but {size} were written" in warnings[0]) if damage == "truncated" else (
        "does not match the sha256" in warnings[0])
    assert entries(tmp_path) == [entry] and data.stat().st_size == size
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # control: the rebuilt entry is a hit again
        assert cached_examples(tmp_path, key, build, "train") == (fresh, True)
    assert build.calls == 2 and not caplog.records


def test_an_entry_of_an_older_ftlab_is_rebuilt_once(tmp_path, tokenizer, records, caplog):
    build = Builder(tokenizer, records)
    key = key_for(records, tokenizer)
    fresh, _ = cached_examples(tmp_path, key, build, "train")
    (entry,) = entries(tmp_path)
    (entry / COMPLETE_MARKER).write_text(json.dumps({"built_at": 1.0}))  # a marker without hashes
    with caplog.at_level(logging.WARNING):
        assert cached_examples(tmp_path, key, build, "train") == (fresh, False)
        assert cached_examples(tmp_path, key, build, "train") == (fresh, True)
    assert build.calls == 2
    assert [r.message for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"cache entry {entry} cannot be used: it was built by an older ftlab, whose completion marker records no"
        " content hashes; removing it and building it again"
    ]
