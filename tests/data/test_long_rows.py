"""Very long rows: text far beyond what is kept is cut before tokenizing (so a row of megabytes
does not take a minute to tokenize), without changing a single kept token or label, and every
file with rows longer than data.max_length gets one warning that names it, the count and its
longest row."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

import ftlab.data.encode as encode
from ftlab.cache import fingerprint
from ftlab.data.cache import rows_fingerprint, tokenizer_fingerprint
from ftlab.data.datamodule import UNTRUNCATED, FineTuneDataModule
from ftlab.data.encode import CUT_CHARS_PER_TOKEN, encode_example, encode_pair
from ftlab.models.loading import load_tokenizer
from ftlab.models.tiny import TINY_TOKENIZER_DIR

MAX_LENGTH = 64  # cut above 64 * 32 = 2048 characters


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)


def _words(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["lamp", "river", "Stone,", "über", "42", "3.14", "(x)", "a\tb", "end.\n\n", "well-known", "  ", "é", "你好"]
    out, size = [], 0
    while size < chars:
        out.append(rng.choice(vocab))
        size += len(out[-1]) + 1
    return " ".join(out)[:chars]


TEXTS = {
    "words": _words(40_000),
    "digits": "".join(random.Random(1).choice("0123456789 ") for _ in range(40_000)),
    "one long word": "ab" * 20_000,
    "runs of one character": ("=" * 500 + "\n") * 80,
}


def _chat(answer: str, question: str = "Summarize the report.") -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "_where": "d.jsonl line 1"}


@pytest.mark.parametrize("kind", list(TEXTS))
def test_cutting_keeps_every_kept_token_and_label(tokenizer, kind):
    text = TEXTS[kind]
    assert len(text) > MAX_LENGTH * CUT_CHARS_PER_TOKEN  # long enough to be cut
    for example in (_chat(text), _chat("Short answer.", question=text), {"text": text}):
        full = encode_example(tokenizer, example, UNTRUNCATED)
        cut = encode_example(tokenizer, example, UNTRUNCATED, keep_tokens=MAX_LENGTH)
        assert len(cut["input_ids"]) < len(full["input_ids"])  # it was cut...
        assert len(cut["input_ids"]) > MAX_LENGTH  # ...and is still longer than what is kept
        for key in ("input_ids", "attention_mask", "labels"):
            assert cut[key][:MAX_LENGTH] == full[key][:MAX_LENGTH]  # exactly today's truncation
    label_ids = {"a": 0, "b": 1}
    row = {"text": text, "label": "b"}
    assert (encode_example(tokenizer, row, MAX_LENGTH, label_ids)
            == encode_example(tokenizer, row, MAX_LENGTH, label_ids, keep_tokens=MAX_LENGTH))


def test_a_pair_is_cut_after_finding_its_shared_prompt(tokenizer):
    text = TEXTS["words"]
    # the answers differ only after the cut: cut first, they would look like one shared prompt
    pair = {**_chat(text + " yes"), "rejected": _chat(text + " no")["messages"]}
    full = encode_pair(tokenizer, pair, UNTRUNCATED)
    cut = encode_pair(tokenizer, pair, UNTRUNCATED, keep_tokens=MAX_LENGTH)
    for key, value in cut.items():
        assert len(value) < len(full[key]) and value[:MAX_LENGTH] == full[key][:MAX_LENGTH]
    assert any(x != -100 for x in cut["chosen_labels"][:MAX_LENGTH])


def test_text_denser_than_the_first_cut_is_retried_longer(tokenizer, monkeypatch):
    monkeypatch.setattr(encode, "CUT_CHARS_PER_TOKEN", 1)  # the first cut then always has too few tokens
    seen: list[int] = []
    real = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        seen.append(len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    text = TEXTS["words"]
    head = encode.cut_text(tokenizer, text, MAX_LENGTH)
    assert head == text[: seen[-1]] and seen[:2] == [MAX_LENGTH, 2 * MAX_LENGTH]  # doubled until long enough
    assert len(real(tokenizer, head, add_special_tokens=False)["input_ids"]) > MAX_LENGTH + encode.CUT_MARGIN
    assert encode.cut_text(tokenizer, "short", MAX_LENGTH) == "short"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int = 12) -> list[dict]:
    return [{"prompt": f"What is {i} + 1?", "response": str(i + 1)} for i in range(n)]


def _module(tokenizer, path: Path, cache_dir: Path | None = None, **cfg) -> FineTuneDataModule:
    dm = FineTuneDataModule({"name": "d", "path": str(path), "val_ratio": 0.0, "max_length": MAX_LENGTH,
                             "cache": cache_dir is not None, **cfg})
    dm.connect(tokenizer, cache_dir=cache_dir)
    return dm


def test_a_huge_row_is_cut_before_tokenizing_and_warned_about(tokenizer, tmp_path, monkeypatch, caplog):
    huge = _words(400_000, seed=2)  # 400 KB: tokenizing it whole takes seconds
    medium = _words(1_000, seed=3)  # over MAX_LENGTH tokens, under the cut
    rows = _rows()
    rows[4] = {"prompt": "Summarize:", "response": huge}
    rows[8] = {"prompt": "Repeat:", "response": medium}
    path = _write(tmp_path / "train.jsonl", rows)
    tokenized: list[int] = []
    real = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__",
                        lambda self, text, *a, **k: tokenized.append(len(text)) or real(self, text, *a, **k))
    dm = _module(tokenizer, path)
    with caplog.at_level(logging.WARNING, logger="ftlab.data.datamodule"):
        dm.setup()
    assert max(tokenized) < 10_000  # never the whole 400 KB
    chars = len(dm.train_records[4]["messages"][1]["content"])  # as prepared (whitespace normalized)
    (warning,) = [r.message for r in caplog.records]
    assert warning == (
        f"{path}: 2 rows longer than data.max_length={MAX_LENGTH} tokens are truncated to the first {MAX_LENGTH} tokens"
        f" (the rest is not trained on); the longest is line 5, with a text of {chars:,} characters (only its"
        f" start was tokenized). Raise data.max_length to train on more of it, or set data.max_tokens to drop such rows"
    )
    assert dm.summary()["preparation"][-2]["truncated"] == 2
    # the same examples as tokenizing every row whole
    monkeypatch.setattr(encode, "CUT_CHARS_PER_TOKEN", 10**9)
    whole = _module(tokenizer, path)
    whole.setup()
    assert dm.train_dataset.examples == whole.train_dataset.examples


def test_the_warning_gives_tokens_for_a_row_tokenized_whole_and_one_line_per_file(tokenizer, tmp_path, caplog):
    rows = _rows(20)
    for i, size in ((2, 1_200), *((i, 400) for i in range(10, 20))):
        rows[i] = {"prompt": "Repeat:", "response": _words(size, seed=i)}
    path = _write(tmp_path / "train.jsonl", rows)
    dm = _module(tokenizer, path, val_ratio=0.5)
    with caplog.at_level(logging.WARNING, logger="ftlab.data.datamodule"):
        dm.setup()
    long_rows = [r for r in dm.train_records + dm.val_records if len(r["messages"][1]["content"]) >= 300]
    assert {r in dm.val_records for r in long_rows} == {True, False}  # in both splits: still one line
    (warning,) = [r.message for r in caplog.records]
    row = next(r for r in long_rows if r["_where"].endswith("line 3"))
    length = len(encode_example(tokenizer, row, UNTRUNCATED)["input_ids"])
    chars = len(row["messages"][1]["content"])
    assert warning.startswith(f"{path}: 11 rows longer than data.max_length={MAX_LENGTH} tokens are truncated")
    assert f"the longest is line 3, with {length:,} tokens (a text of {chars:,} characters)" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftlab.data.datamodule"):  # control: nothing is truncated
        _module(tokenizer, _write(tmp_path / "short.jsonl", _rows())).setup()
    assert caplog.records == []


def test_max_tokens_drops_a_huge_row_as_before(tokenizer, tmp_path):
    rows = _rows()
    rows[3] = {"prompt": "Summarize:", "response": _words(100_000, seed=5)}
    dm = _module(tokenizer, _write(tmp_path / "train.jsonl", rows), max_tokens=200)
    dm.setup()
    assert len(dm.train_dataset) == 11
    assert dm.length_reports[0].dropped == {"too long (> 200 tokens)": 1} and dm.length_reports[0].truncated == 0


def test_cache_keys_change_only_for_data_with_rows_to_cut(tokenizer, tmp_path):
    cache = tmp_path / "cache"
    path = _write(tmp_path / "train.jsonl", _rows())
    dm = _module(tokenizer, path, cache_dir=cache)
    dm.setup()
    key = {"data": rows_fingerprint(dm.train_records), "tokenizer": tokenizer_fingerprint(tokenizer), "labels": None}
    assert (cache / "tokenized" / f"d-train-{fingerprint(key, 16)}").is_dir()  # the key entries always had
    long_rows = _rows()
    long_rows[0] = {"prompt": "Summarize:", "response": _words(10_000, seed=6)}
    long_dm = _module(tokenizer, _write(tmp_path / "long.jsonl", long_rows), cache_dir=cache)
    long_dm.setup()
    other = {"data": rows_fingerprint(long_dm.train_records), "tokenizer": tokenizer_fingerprint(tokenizer),
             "labels": None, "cut": {"keep_tokens": MAX_LENGTH, "chars_per_token": 32, "margin": 16}}
    assert (cache / "tokenized" / f"d-train-{fingerprint(other, 16)}").is_dir()
    again = _module(tokenizer, tmp_path / "long.jsonl", cache_dir=cache, max_length=2 * MAX_LENGTH)
    again.setup()  # cut for another length: another entry, not the tokens cut for MAX_LENGTH
    assert again.cache_hits["train"] is False
    assert len([p for p in (cache / "tokenized").glob("d-train-*") if p.is_dir()]) == 3
