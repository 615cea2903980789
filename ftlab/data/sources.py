"""Read rows from any common data source, failing loudly and precisely on anything malformed.

Why strict: a silently skipped or misread record changes what a run trains on without anyone
noticing. Every error names the file, the 1-based line (or row, or item), the field and what was
expected, so a bad dataset is fixed in one look instead of debugged from a loss curve.

``read_rows`` returns raw records, each with the place it came from (``Row.where``), so that the
format layer (``ftlab.data.formats``) can say exactly which row is wrong. Sources:

* ``.jsonl``: one JSON object per line, blank lines skipped;
* ``.json``: a JSON array of objects, or an object with exactly one list of them (``{"data": [...]}``);
* ``.csv``: a header line, then one record per row (every value a string, empty cells ``""``);
* ``.parquet``: read with pyarrow;
* a folder written by ``datasets`` ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``);
* anything else that is not a path: a Hugging Face hub dataset id.

``load_jsonl`` keeps the older chat-only loader: JSONL records normalized to
``{"messages": [...], **other_keys}`` from the messages, prompt/response or alpaca shapes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "DataError",
    "ROLES",
    "Row",
    "SUFFIXES",
    "json_type",
    "load_jsonl",
    "normalize_record",
    "read_rows",
    "validate_messages",
    "write_jsonl",
    "write_splits_main",
]

from ftlab.errors import DataError

ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_EXPECTED_SHAPE = (
    "expected either 'messages': [{role, content}, ...] or 'prompt' and 'response';"
    " alpaca 'instruction' and 'output' also work"
)
_GIVE_A_SOURCE = "Give a .jsonl/.json/.csv/.parquet file or a folder saved with datasets.save_to_disk"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from, e.g. ``"data/train.csv row 7"`` (for error messages)."""

    where: str
    record: dict


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string"}.get(
        type(value), type(value).__name__
    )


def json_type(value: Any) -> str:
    """The JSON name of a value's type (what a user sees in their file): number, not int."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _require_str(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {_type_name(value)}")
    return value


def validate_messages(
    messages: Any, where: str, field: str = "messages", require_answer: bool = True
) -> list[dict]:
    """Check roles, contents and that the conversation ends with the assistant's turn to train on.

    ``where`` prefixes the error messages, e.g. ``"data.jsonl line 7"``; ``field`` is the
    record's key holding the list. ``require_answer=False`` accepts a prompt-only conversation
    (a preference record's prompt), which need not end with the assistant.
    """
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: field '{field}' must be a list of {{role, content}} objects,"
            f" got {json_type(messages)}"
        )
    if not messages:
        raise DataError(f"{where}: field '{field}' is empty (expected at least one assistant message)")
    for i, message in enumerate(messages):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: field '{name}' must be an object with 'role' and 'content',"
                f" got {json_type(message)}"
            )
        if "role" not in message:
            raise DataError(f"{where}: missing field '{name}.role' (expected one of {', '.join(ROLES)})")
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: field '{name}.role' is {message['role']!r}"
                f" (expected one of {', '.join(ROLES)})"
            )
        if "content" not in message:
            raise DataError(f"{where}: missing field '{name}.content' (expected a string)")
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: field '{name}.content' must be a string,"
                f" got {json_type(message['content'])}"
            )
    last = len(messages) - 1
    if require_answer and messages[last]["role"] != "assistant":
        raise DataError(
            f"{where}: field '{field}[{last}].role' is {messages[last]['role']!r}"
            " (expected the last message to be from the assistant)"
        )
    return messages


def normalize_record(record: Any, where: str) -> dict:
    """Return ``{"messages": [...], **other_keys}`` for any accepted shape, or raise DataError."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")
    if "messages" in record:
        return {**record, "messages": validate_messages(record["messages"], where)}
    if "prompt" in record or "response" in record:
        pair = ("prompt", "response")
    elif "instruction" in record or "output" in record:
        pair = ("instruction", "output")
    else:
        raise DataError(f"{where}: missing field 'messages' ({_EXPECTED_SHAPE})")
    for key in pair:
        if key not in record:
            raise DataError(f"{where}: missing field '{key}' (records with '{pair[0]}' need '{pair[1]}')")
    user, answer = (_require_str(record, key, where) for key in pair)
    consumed = set(pair)
    if pair[0] == "instruction" and "input" in record:
        extra = _require_str(record, "input", where)
        user = f"{user}\n\n{extra}" if extra else user
        consumed.add("input")
    rest = {k: v for k, v in record.items() if k not in consumed}
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {**rest, "messages": messages}


def load_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL file, normalized; raises DataError on the first bad line."""
    return [normalize_record(row.record, row.where) for row in _read_jsonl(Path(path))]


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept readable)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_splits_main(
    argv: Sequence[str] | None,
    description: str | None,
    make_splits: Callable[[int, int, int], tuple[list[dict], list[dict]]],
    num_train: int,
    num_val: int,
    alternatives: Mapping[str, tuple[str, Callable[[int, int, int], tuple[list[dict], list[dict]]]]] | None = None,
) -> None:
    """The command line of a generated dataset: ``--out DIR [--num-train N --num-val M --seed S]``
    writes ``make_splits(num_train, num_val, seed)`` as ``train.jsonl`` and ``validation.jsonl``;
    each of ``alternatives`` (name -> (help, make_splits)) is a flag ``--name`` that writes its
    data instead."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--num-train", type=int, default=num_train)
    parser.add_argument("--num-val", type=int, default=num_val)
    parser.add_argument("--seed", type=int, default=0)
    choices = dict(alternatives or {})
    for name, (help_text, _) in choices.items():
        parser.add_argument(f"--{name}", action="store_true", help=help_text)
    args = parser.parse_args(argv)
    for name, (_, alternative) in choices.items():
        if getattr(args, name.replace("-", "_")):
            make_splits = alternative
    train, val = make_splits(args.num_train, args.num_val, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "validation.jsonl", val)
    print(f"wrote {len(train)} train and {len(val)} validation records to {args.out}")


# ---------------------------------------------------------------- reading rows


def read_rows(source: str | Path, split: str | None = None) -> list[Row]:
    """Every record of ``source`` (a file, a saved-dataset folder or a hub id), in order.

    ``split`` picks the split of a saved ``DatasetDict`` or a hub dataset (default "train");
    files and single saved datasets have no splits and ignore it.
    """
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(
                f"{path}: unknown file type {suffix or '(no suffix)'!r}"
                f" (expected one of {', '.join(SUFFIXES)}, or a folder saved with datasets.save_to_disk)"
            )
        return readers[suffix](path)
    text = str(source)
    if _looks_like_path(text):
        raise DataError(f"{path}: no such file")
    return _read_hub(text, split)


def _looks_like_path(text: str) -> bool:
    """A missing path, rather than a hub id such as ``owner/name``."""
    return (
        Path(text).suffix.lower() in SUFFIXES
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or not _HUB_ID.match(text)
    )


def _read_text(path: Path) -> str:
    """The file's text, line ends untouched; ``utf-8-sig`` drops the byte-order mark editors write."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at position {e.start})") from None


def _json_problem(e: json.JSONDecodeError) -> str:
    """``Expecting value at column 11``; some messages already end in "at" ("starting at")."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _check_object(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    return obj


def _read_jsonl(path: Path) -> list[Row]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: invalid JSON ({_json_problem(e)}); expected one JSON object per line"
            ) from None
        rows.append(Row(where, _check_object(obj, where)))
    if not rows:
        raise DataError(f"{path}: file is empty (expected one JSON object per line)")
    return rows


def _read_json(path: Path) -> list[Row]:
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty (expected a JSON array of objects)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one JSON object per line is JSONL: name the file .jsonl" if e.msg == "Extra data" else ""
        raise DataError(
            f"{path} line {e.lineno}: invalid JSON ({_json_problem(e)});"
            f" expected a JSON array of objects{hint}"
        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            found = f"list-valued keys {', '.join(map(repr, lists))}" if lists else "no list-valued key"
            raise DataError(
                f"{path}: expected a JSON array of objects or an object with exactly one list of them"
                f" (like {{\"data\": [...]}}), got an object with {found}"
            )
        data = data[lists[0]]
    elif not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {_type_name(data)}")
    if not data:
        raise DataError(f"{path}: no records (the JSON array is empty)")
    return [Row(f"{path} item {i}", _check_object(obj, f"{path} item {i}")) for i, obj in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    rows: list[Row] = []
    header: list[str] | None = None
    try:
        end = 0  # the file line the previous record ended on
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells or (len(cells) == 1 and not cells[0].strip()):  # a blank line
                continue
            if header is None:
                header = _check_header(cells, path, start)
                continue
            where = f"{path} row {start}"
            if len(cells) != len(header):
                raise DataError(
                    f"{where}: {len(cells)} cells, but the header (line 1) has {len(header)}"
                    " (quote values that contain commas)"
                )
            rows.append(Row(where, dict(zip(header, cells))))
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: invalid CSV ({e})") from None
    if header is None:
        raise DataError(f"{path}: file is empty (expected a header line, then one record per line)")
    if not rows:
        raise DataError(f"{path}: no records (only the header line)")
    return rows


def _check_header(cells: list[str], path: Path, lineno: int) -> list[str]:
    header = [c.strip() for c in cells]
    for i, name in enumerate(header, start=1):
        if not name:
            raise DataError(f"{path} line {lineno}: column {i} of the header has no name")
        if header.index(name) != i - 1:
            raise DataError(f"{path} line {lineno}: column {name!r} appears twice in the header")
    return header


def _short(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: enough to act on."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types; the user needs the file and the reason
        raise DataError(f"{path}: cannot read it as Parquet ({_short(e)})") from None
    if not records:
        raise DataError(f"{path}: no records (the Parquet table has no rows)")
    return [Row(f"{path} row {i}", r) for i, r in enumerate(records, start=1)]


def _read_saved_dataset(path: Path, split: str | None) -> list[Row]:
    if (path / "dataset_dict.json").is_file():
        is_dict = True
    elif (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        is_dict = False
    else:
        raise DataError(
            f"{path}: a folder, but not one saved with datasets.save_to_disk"
            f" (no dataset_dict.json, state.json or dataset_info.json). {_GIVE_A_SOURCE}"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load the saved dataset ({_short(e)})") from None
    prefix = str(path)
    if is_dict or isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(loaded)})")
        loaded, prefix = loaded[split], f"{path} (split {split})"
    return _dataset_rows(loaded, prefix)


def _dataset_rows(dataset: Any, prefix: str) -> list[Row]:
    records = dataset.to_list()
    if not records:
        raise DataError(f"{prefix}: no records (the dataset has no rows)")
    return [Row(f"{prefix} row {i}", r) for i, r in enumerate(records, start=1)]


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, checked in seconds; None when it can (or when unsure).

    ``datasets.load_dataset`` retries an unreachable hub for about half a minute before failing.
    Offline mode (HF_HUB_OFFLINE=1) fails fast on its own and may find a cached copy, and a
    proxy makes a direct connection test meaningless, so both skip the check.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        return f"cannot reach {host}:{port} ({e}; with HF_HUB_OFFLINE=1 a cached copy is used)"
    return None


def _read_hub(name: str, split: str | None) -> list[Row]:
    split = split or "train"
    reason = _hub_unreachable()
    if reason is None:
        import datasets

        try:
            return _dataset_rows(datasets.load_dataset(name, split=split), f"{name} (hub, split {split})")
        except DataError:
            raise
        except Exception as e:  # network, missing repo, bad split: one message, not a traceback
            reason = _short(e)
    raise DataError(
        f"{name}: not a local file or folder, and loading it as a Hugging Face hub dataset failed"
        f" (no network?): {reason}. {_GIVE_A_SOURCE}"
    )
