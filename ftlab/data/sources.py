"""Load chat records from JSONL, failing loudly and precisely on anything malformed.

Why strict: a silently skipped or misread record changes what a run trains on without anyone
noticing. Every error names the file, the 1-based line, the field and what was expected, so a
bad dataset is fixed in one look instead of debugged from a loss curve.

Accepted record shapes (one JSON object per line; blank lines are ignored):

* ``{"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", ...}]}``
* ``{"prompt": ..., "response": ...}``
* alpaca: ``{"instruction": ..., "input": ... (optional), "output": ...}``

Each is normalized to ``{"messages": [...], **other_keys}`` (the consumed prompt/response or
instruction/input/output keys are dropped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["DataError", "ROLES", "load_jsonl", "normalize_record", "validate_messages", "write_jsonl"]

from ftlab.errors import FtlabError

ROLES = ("system", "user", "assistant")
_EXPECTED_SHAPE = (
    "expected either 'messages': [{role, content}, ...] or 'prompt' and 'response';"
    " alpaca 'instruction' and 'output' also work"
)


class DataError(FtlabError):
    """A data file or record does not have the expected shape."""


def _type_name(value: Any) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string"}.get(
        type(value), type(value).__name__
    )


def _require_str(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {_type_name(value)}")
    return value


def validate_messages(messages: Any, where: str) -> list[dict]:
    """Check roles, contents and that the conversation ends with the assistant's turn to train on.

    ``where`` prefixes the error messages, e.g. ``"data.jsonl line 7"``.
    """
    if not isinstance(messages, list):
        raise DataError(
            f"{where}: field 'messages' must be a list of {{role, content}} objects,"
            f" got {_type_name(messages)}"
        )
    if not messages:
        raise DataError(f"{where}: field 'messages' is empty (expected at least one assistant message)")
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: field '{field}' must be an object with 'role' and 'content',"
                f" got {_type_name(message)}"
            )
        if "role" not in message:
            raise DataError(f"{where}: missing field '{field}.role' (expected one of {', '.join(ROLES)})")
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: field '{field}.role' is {message['role']!r}"
                f" (expected one of {', '.join(ROLES)})"
            )
        if "content" not in message:
            raise DataError(f"{where}: missing field '{field}.content' (expected a string)")
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: field '{field}.content' must be a string,"
                f" got {_type_name(message['content'])}"
            )
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise DataError(
            f"{where}: field 'messages[{last}].role' is {messages[last]['role']!r}"
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
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
                ) from None
            records.append(normalize_record(obj, where))
    if not records:
        raise DataError(f"{path}: file is empty (expected one JSON object per line)")
    return records


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, non-ASCII kept readable)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
