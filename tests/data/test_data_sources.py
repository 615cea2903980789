"""Tests of reading rows from every source: files, saved datasets, hub ids, and their errors."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest

from ftlab.data import sources
from ftlab.data.sources import DataError, Row, read_rows, write_jsonl

# A uniform schema, so columnar formats (Parquet, datasets) read back exactly what was written.
RECORDS = [
    {"instruction": "Add the numbers", "input": "2 3", "output": "5", "id": "a"},
    {"instruction": "Say hi", "input": "", "output": "hi", "id": "b"},
    {"instruction": "Greet\nin German", "input": "Anna", "output": "Hallo, Anna", "id": "c"},
]
CHATS = [
    {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}], "task": "t"},
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], "task": "u"},
]


def _raises(message: str):
    return pytest.raises(DataError, match="^" + re.escape(message))


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


# ---------------------------------------------------------------- every source reads back


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    rows = read_rows(path)
    assert [r.record for r in rows] == RECORDS[:2]
    assert [r.where for r in rows] == [f"{path} line 1", f"{path} line 3"]  # blank line 2 skipped


@pytest.mark.parametrize("wrap", [False, True], ids=["array", "data-key"])
def test_json(tmp_path: Path, wrap: bool) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"version": 2, "data": RECORDS} if wrap else RECORDS, indent=2))
    rows = read_rows(path)
    assert [r.record for r in rows] == RECORDS
    assert rows[2] == Row(f"{path} item 3", RECORDS[2])


def test_csv_rows_are_file_line_numbers_and_empty_cells_stay(tmp_path: Path) -> None:
    header = list(RECORDS[0])
    path = _write_csv(tmp_path / "train.csv", [header] + [[r[k] for k in header] for r in RECORDS])
    rows = read_rows(path)
    assert [r.record for r in rows] == RECORDS
    assert rows[1].record["input"] == ""
    # record 3 starts on line 4; its quoted two-line field does not shift its own number
    assert [r.where for r in rows] == [f"{path} row 2", f"{path} row 3", f"{path} row 4"]


def test_csv_multiline_field_shifts_following_rows(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", [["text", "label"], ["two\nlines", "x"], ["after", "y"]])
    assert [r.where for r in read_rows(path)] == [f"{path} row 2", f"{path} row 4"]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(CHATS), path)
    rows = read_rows(path)
    assert [r.record for r in rows] == CHATS
    assert rows[1].where == f"{path} row 2"


def test_saved_dataset_folder(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(tmp_path / "ds", split="ignored")
    assert [r.record for r in rows] == RECORDS
    assert rows[0].where == f"{tmp_path / 'ds'} row 1"


def test_saved_dataset_dict_split_selection(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "ds_folder"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(CHATS), "validation": datasets.Dataset.from_list(CHATS[:1])}
    ).save_to_disk(str(folder))
    train = read_rows(folder)  # default split: train
    assert [r.record for r in train] == CHATS
    assert train[1].where == f"{folder} (split train) row 2"
    val = read_rows(str(folder), split="validation")
    assert [r.record for r in val] == CHATS[:1] and val[0].where == f"{folder} (split validation) row 1"
    with _raises(f"{folder}: no split 'test' (splits: train, validation)"):
        read_rows(folder, split="test")


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    with _raises(f"{tmp_path}: a folder, but not one saved with datasets.save_to_disk (no dataset_dict.json"):
        read_rows(tmp_path)


# ---------------------------------------------------------------- hub ids


def test_hub_id_without_network_is_one_clear_error_fast() -> None:
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        read_rows("nobody-ftlab/no-such-dataset")
    message = str(info.value)
    assert message.startswith(
        "nobody-ftlab/no-such-dataset: not a local file or folder, and loading it as a Hugging Face hub"
        " dataset failed (no network?): "
    )
    assert message.endswith(
        ". Give a .jsonl/.json/.csv/.parquet file or a folder saved with datasets.save_to_disk"
    )
    assert "\n" not in message
    assert time.monotonic() - start < 15


def test_hub_id_loads_the_split_and_wraps_failures(monkeypatch) -> None:
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        if name == "user/broken":
            raise ConnectionError("Couldn't reach 'user/broken' on the Hub (LocalEntryNotFoundError)\nmore")
        return datasets.Dataset.from_list(CHATS)

    monkeypatch.setattr(sources, "_hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = read_rows("user/ds", split="validation")
    assert [r.record for r in rows] == CHATS and rows[0].where == "user/ds (hub, split validation) row 1"
    assert read_rows("user/ds")[1].where == "user/ds (hub, split train) row 2"
    with _raises(
        "user/broken: not a local file or folder, and loading it as a Hugging Face hub dataset failed"
        " (no network?): ConnectionError: Couldn't reach 'user/broken' on the Hub (LocalEntryNotFoundError)."
        " Give a .jsonl"
    ):
        read_rows("user/broken")
    assert calls[0] == ("user/ds", "validation")


# ---------------------------------------------------------------- bad input


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with _raises(f"{tmp_path / 'data' / 'train.jsonl'}: no such file"):
        read_rows(tmp_path / "data" / "train.jsonl")
    with _raises("data/train.csv: no such file"):
        read_rows("data/train.csv")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello\n")
    with _raises(
        f"{txt}: unknown file type '.txt' (expected one of .jsonl, .json, .csv, .parquet,"
        " or a folder saved with datasets.save_to_disk)"
    ):
        read_rows(txt)


def test_jsonl_malformed_line_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "no end}\n')
    with _raises(f"{path} line 3: invalid JSON (Unterminated string starting at column 10);"):
        read_rows(path)


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n["text"]\n')
    with _raises(f"{path} line 2: expected a JSON object, got array"):
        read_rows(path)


def test_json_errors(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[{"text": "a"}, "b"]')
    with _raises(f"{path} item 2: expected a JSON object, got string"):
        read_rows(path)
    path.write_text('[{"text": "a"},\n {"text": }]')
    with _raises(f"{path} line 2: invalid JSON (Expecting value at column 11); expected a JSON array of objects"):
        read_rows(path)
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with _raises(f"{path} line 2: invalid JSON (Extra data at column 1); expected a JSON array of objects;"
                 " one JSON object per line is JSONL: name the file .jsonl"):
        read_rows(path)
    path.write_text('{"train": [], "test": []}')
    with _raises(f"{path}: expected a JSON array of objects or an object with exactly one list of them"
                 " (like {\"data\": [...]}), got an object with list-valued keys 'train', 'test'"):
        read_rows(path)
    path.write_text("[]")
    with _raises(f"{path}: no records (the JSON array is empty)"):
        read_rows(path)


def test_csv_row_with_wrong_cell_count(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\nfine,pos\n\nnot, fine,neg\n")
    with _raises(f"{path} row 4: 3 cells, but the header (line 1) has 2 (quote values that contain commas)"):
        read_rows(path)


def test_csv_header_problems(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,text\na,b\n")
    with _raises(f"{path} line 1: column 'text' appears twice in the header"):
        read_rows(path)
    path.write_text("text,\na,b\n")
    with _raises(f"{path} line 1: column 2 of the header has no name"):
        read_rows(path)
    path.write_text("text,label\n")
    with _raises(f"{path}: no records (only the header line)"):
        read_rows(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("e.jsonl", "file is empty (expected one JSON object per line)"),
        ("e.json", "file is empty (expected a JSON array of objects)"),
        ("e.csv", "file is empty (expected a header line, then one record per line)"),
    ],
)
def test_empty_files(tmp_path: Path, name: str, message: str) -> None:
    path = tmp_path / name
    path.write_text("\n  \n")
    with _raises(f"{path}: {message}"):
        read_rows(path)


def test_unreadable_parquet_and_non_utf8_are_wrapped(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with _raises(f"{path}: cannot read it as Parquet (ArrowInvalid: "):
        read_rows(path)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with _raises(f"{latin}: not UTF-8 text (invalid byte at position 13)"):
        read_rows(latin)


def test_load_jsonl_still_normalizes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": "q", "response": "a", "id": 1}])
    assert sources.load_jsonl(path) == [
        {"id": 1, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    ]
    with _raises(f"{tmp_path / 'gone.jsonl'}: no such file"):
        sources.load_jsonl(tmp_path / "gone.jsonl")
