"""Turn each raw row of any common dataset format into one canonical example.

Why one canonical shape: tokenization, evaluation and the training methods then handle a single
shape, whatever the data came as. Chat-like formats become ``{"messages": [...]}`` (system /
user / assistant, ending with the assistant's answer, the part that is trained on); plain text
for continued pre-training stays ``{"text": ...}``; classification keeps ``{"text", "label"}``;
preference data trains on the chosen answer and keeps the rejected conversation in
``"rejected"`` for a preference method. Keys the format does not consume are carried through
unchanged (the synthetic data's ``task`` and ``answer``), and the row's origin is kept in
``"_where"`` (keys starting with ``_`` are metadata, not data).

Formats (``data.format``), with the fields each reads:

* ``alpaca``: instruction, output; input and system optional
* ``messages``: messages (OpenAI ``{role, content}``) or conversations (ShareGPT ``{from, value}``)
* ``completion``: prompt, completion (or response)
* ``text``: text
* ``classification``: text, label (a string or an integer)
* ``preference``: prompt, chosen, rejected (strings, or message lists); or prompt and
  responses, a list of two or more answers ranked best first, which becomes one example per
  (better, worse) pair (``to_examples``)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ftlab.data.sources import Row, json_type, validate_messages
from ftlab.errors import DataError

__all__ = [
    "FORMATS", "NEEDS", "RANKED", "SHAREGPT_ROLES", "detect_format", "missing_error", "missing_fields", "pair_record",
    "shared_prefix", "to_example", "to_examples",
]

FORMATS = ("alpaca", "messages", "completion", "text", "classification", "preference")

#: What each format needs, as shown in error messages.
NEEDS = {
    "alpaca": "instruction, output; input and system are optional",
    "messages": "messages (a list of {role, content}) or conversations (ShareGPT: a list of {from, value})",
    "completion": "prompt, completion (or response)",
    "text": "text",
    "classification": "text, label",
    "preference": "prompt, chosen, rejected; or prompt, responses (answers ranked best first)",
}

#: The field of a ranked preference row: two or more answers, best first (RRHF/PRO-style data).
RANKED = "responses"

#: Required fields; a tuple inside means "any one of these".
_REQUIRED: dict[str, tuple[str | tuple[str, ...], ...]] = {
    "alpaca": ("instruction", "output"),
    "messages": (("messages", "conversations"),),
    "completion": ("prompt", ("completion", "response")),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),
}
_RANKED_REQUIRED: tuple[str, ...] = ("prompt", RANKED)


def _required(fmt: str, keys: Any) -> tuple[str | tuple[str, ...], ...]:
    """The required fields of ``fmt`` for a row with ``keys``: a preference row with a ranked list
    needs ``prompt`` and ``responses`` instead of ``chosen`` and ``rejected`` (it may not have both)."""
    if fmt == "preference" and RANKED in keys:
        return _RANKED_REQUIRED
    return _REQUIRED[fmt]

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

_DETECT_ROWS = 100  # enough to see the shape; detection must stay cheap on large sources


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DataError(f"data.format: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


def _is_empty(value: Any) -> bool:
    """Null counts as missing: Parquet, CSV readers and ``datasets`` store an absent value as null."""
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def missing_fields(record: Mapping[str, Any], fmt: str) -> list[str]:
    """Required fields of ``fmt`` that ``record`` lacks or has empty (null, blank string, empty list).

    An alternative (``completion`` or ``response``) is reported by its first name. A null value
    is missing too.
    """
    _check_format(fmt)
    missing = []
    for required in _required(fmt, record):
        names = required if isinstance(required, tuple) else (required,)
        if all(name not in record or _is_empty(record[name]) for name in names):
            missing.append(names[0])
    return missing


def missing_error(where: str, name: str, fmt: str, record: Mapping[str, Any] | None = None) -> DataError:
    """The error for a required field that is absent or empty: "missing field" when ``record``
    (if given) lacks it or holds null, "field ... is empty" when it holds a blank string or list."""
    if record is not None and record.get(name) is not None:
        return DataError(f"{where}: field '{name}' is empty (format {fmt} needs {NEEDS[fmt]})")
    return DataError(f"{where}: missing field '{name}' (format {fmt} needs {NEEDS[fmt]})")


def _fits(keys: set[str]) -> list[str]:
    """Formats whose required keys are all present, less those another fitting format extends.

    ``{text, label}`` fits text and classification; classification needs more of the row, so
    it is the one meant.
    """
    def needed(fmt: str) -> set[str]:
        return {r if isinstance(r, str) else next(n for n in r if n in keys) for r in _required(fmt, keys)}

    fits = [
        f for f in FORMATS
        if all((r in keys) if isinstance(r, str) else any(n in keys for n in r) for r in _required(f, keys))
    ]
    return [f for f in fits if not any(needed(f) < needed(g) for g in fits if g != f)]


def detect_format(rows: Sequence[Row], source: str) -> str:
    """The format the keys of the first rows fit; DataError when none or several fit.

    A row that fits no format is skipped when others fit: its missing field is then reported
    precisely (or dropped) by the preparation step instead of hiding the format.
    """
    if not rows:
        raise DataError(f"{source}: no rows to detect the data format from")
    found: dict[str, str] = {}  # format -> where it was first seen
    keys_seen: list[str] = []
    for row in rows[:_DETECT_ROWS]:
        keys = set(row.record)
        keys_seen += [k for k in row.record if k not in keys_seen]
        fits = _fits(keys)
        if len(fits) > 1:
            options = " or ".join(f"data.format={f}" for f in fits)
            raise DataError(
                f"{source}: cannot tell the data format: the keys of {row.where} ({', '.join(sorted(keys))})"
                f" fit {', '.join(fits)}; set {options}"
            )
        if fits:
            found.setdefault(fits[0], row.where)
    if len(found) > 1:
        seen = "; ".join(f"{where} is {fmt}" for fmt, where in found.items())
        raise DataError(
            f"{source}: rows have different formats ({seen}); use one format per source,"
            " or set data.format=... to read them all as one"
        )
    if not found:
        needs = "; ".join(f"{fmt} needs {NEEDS[fmt]}" for fmt in FORMATS)
        raise DataError(
            f"{source}: no data format fits the keys found ({', '.join(keys_seen) or 'none'}): {needs}."
            " Rename the fields, or set data.format=..."
        )
    return next(iter(found))


def to_examples(row: Row, fmt: str) -> list[dict]:
    """The canonical examples of ``row`` read as ``fmt``, each with ``"_where"``; DataError if it
    is not one. Every row gives one example, except a ranked preference row (``responses``): one
    per (better, worse) pair, in the order (0, 1), (0, 2), ..., (1, 2), ... of the list."""
    _check_format(fmt)
    record = row.record
    if not isinstance(record, dict):
        raise DataError(f"{row.where}: expected an object, got {json_type(record)}")
    missing = missing_fields(record, fmt)
    if missing:
        raise missing_error(row.where, missing[0], fmt, record)
    if fmt == "preference" and RANKED in record:
        return _ranked(record, row.where)
    example, consumed = _CONVERTERS[fmt](record, row.where)
    rest = {k: v for k, v in record.items() if k not in consumed}
    return [{**rest, **example, "_where": row.where}]


def to_example(row: Row, fmt: str) -> dict:
    """The one canonical example of ``row`` read as ``fmt`` (see ``to_examples``); a ranked row,
    which gives several, is a DataError here."""
    examples = to_examples(row, fmt)
    if len(examples) != 1:
        raise DataError(f"{row.where}: field '{RANKED}' gives {len(examples)} preference pairs, not one example")
    return examples[0]


def _string(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {json_type(value)}")
    return value


def _optional_string(record: Mapping[str, Any], key: str, where: str) -> str:
    """An optional field's text; absent and null both read as "" (columnar files store absent as null)."""
    if record.get(key) is None:
        return ""
    return _string(record, key, where)


def _chat(prompt: str, answer: str, system: str = "") -> list[dict]:
    system_turn = [{"role": "system", "content": system}] if system else []
    return [*system_turn, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _alpaca(record: Mapping[str, Any], where: str) -> tuple[dict, set[str]]:
    instruction, output = _string(record, "instruction", where), _string(record, "output", where)
    extra, system = _optional_string(record, "input", where), _optional_string(record, "system", where)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"messages": _chat(user, output, system)}, {"instruction", "input", "output", "system"}


def _sharegpt(turns: Any, where: str) -> list[dict]:
    valid = ", ".join(SHAREGPT_ROLES)
    if not isinstance(turns, list):
        raise DataError(
            f"{where}: field 'conversations' must be a list of {{from, value}} objects, got {json_type(turns)}"
        )
    messages = []
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: field '{name}' must be an object with 'from' and 'value', got {json_type(turn)}")
        if "from" not in turn:
            raise DataError(f"{where}: missing field '{name}.from' (expected one of {valid})")
        if turn["from"] not in SHAREGPT_ROLES:
            raise DataError(f"{where}: field '{name}.from' is {turn['from']!r} (expected one of {valid})")
        if "value" not in turn:
            raise DataError(f"{where}: missing field '{name}.value' (expected a string)")
        if not isinstance(turn["value"], str):
            raise DataError(f"{where}: field '{name}.value' must be a string, got {json_type(turn['value'])}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise DataError(
            f"{where}: field 'conversations[{last}].from' is {turns[last]['from']!r}"
            " (expected the last turn to be from gpt or assistant)"
        )
    return messages


def _messages(record: Mapping[str, Any], where: str) -> tuple[dict, set[str]]:
    if "messages" in record and not _is_empty(record["messages"]):
        return {"messages": validate_messages(record["messages"], where)}, {"messages"}
    return {"messages": _sharegpt(record["conversations"], where)}, {"conversations"}


def _completion(record: Mapping[str, Any], where: str) -> tuple[dict, set[str]]:
    if "completion" in record and "response" in record:
        raise DataError(f"{where}: fields 'completion' and 'response' are both set (format completion reads one)")
    key = "completion" if "completion" in record else "response"
    return {"messages": _chat(_string(record, "prompt", where), _string(record, key, where))}, {"prompt", key}


def _text(record: Mapping[str, Any], where: str) -> tuple[dict, set[str]]:
    return {"text": _string(record, "text", where)}, {"text"}


def _classification(record: Mapping[str, Any], where: str) -> tuple[dict, set[str]]:
    label = record["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        shown = f"{json_type(label)} {label!r}" if isinstance(label, (float, bool)) else json_type(label)
        raise DataError(f"{where}: field 'label' must be a string or an integer, got {shown}")
    return {"text": _string(record, "text", where), "label": str(label)}, {"text", "label"}


def _prompt_turns(record: Mapping[str, Any], where: str) -> list[dict]:
    prompt = record["prompt"]
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        turns = validate_messages(prompt, where, field="prompt", require_answer=False)
    else:
        raise DataError(f"{where}: field 'prompt' must be a string or a list of {{role, content}}, got {json_type(prompt)}")
    if not any(m["role"] == "user" and m["content"].strip() for m in turns):
        raise DataError(f"{where}: field 'prompt' is empty: no user message with text (expected the question both answers reply to)")
    return turns


def _side(value: Any, prompt_turns: list[dict], where: str, field: str) -> list[dict]:
    """One answer of a preference row as the whole conversation: a string or a message list that
    starts with the assistant answers the prompt; a list that starts otherwise is the whole chat."""
    if isinstance(value, str):
        turns = [{"role": "assistant", "content": value}]
    elif isinstance(value, list):
        turns = validate_messages(value, where, field=field)
    else:
        raise DataError(
            f"{where}: field '{field}' must be a string or a list of {{role, content}}, got {json_type(value)}"
        )
    last = len(turns) - 1
    if not turns[last]["content"].strip():
        name = field if isinstance(value, str) else f"{field}[{last}].content"
        what = f"the {field} answer" if field in ("chosen", "rejected") else "an answer"
        raise DataError(f"{where}: field '{name}' is empty (expected {what})")
    return [*prompt_turns, *turns] if turns[0]["role"] == "assistant" else turns


def shared_prefix(chosen: Sequence[Mapping[str, Any]], rejected: Sequence[Mapping[str, Any]]) -> int:
    """How many leading messages the two conversations of a pair have in common: the prompt.
    The turns after it are each side's answer (what a preference method scores)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and dict(chosen[n]) == dict(rejected[n]):
        n += 1
    return n


def pair_record(example: Mapping[str, Any]) -> dict:
    """A canonical preference example as TRL's conversational preference row: ``prompt`` (the
    messages both sides share), ``chosen`` and ``rejected`` (each side's messages after it, usually
    one assistant turn); other keys (``task``, ``answer``, ``_where``) are carried along."""
    chosen, rejected = list(example["messages"]), list(example["rejected"])
    n = shared_prefix(chosen, rejected)
    rest = {k: v for k, v in example.items() if k not in ("messages", "rejected")}
    return {**rest, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _short_text(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _pair(chosen: list[dict], rejected: list[dict], where: str, names: tuple[str, str]) -> None:
    """A pair must hold two different answers to one prompt: DataError naming the fields if not."""
    a, b = names
    if chosen == rejected:
        raise DataError(
            f"{where}: fields '{a}' and '{b}' are the same answer ({_short_text(chosen[-1]['content'])});"
            " a preference pair needs two different answers (remove the row or fix one side)"
        )
    n = shared_prefix(chosen, rejected)
    for name, turns in ((a, chosen), (b, rejected)):
        if not any(m["role"] == "assistant" for m in turns[n:]):
            raise DataError(
                f"{where}: field '{name}' has no answer of its own: its conversation is the start of the other"
                " side's (a preference pair needs an assistant answer on each side after the shared prompt)"
            )


def _preference(record: Mapping[str, Any], where: str) -> tuple[dict, set[str]]:
    """``messages`` is the chosen conversation (trained on by SFT), ``rejected`` the other.

    A chosen/rejected message list that starts with the assistant is the answer to the prompt; one
    that starts with a user or system turn is the whole conversation (UltraFeedback style).
    """
    prompt_turns = _prompt_turns(record, where)
    chosen = _side(record["chosen"], prompt_turns, where, "chosen")
    rejected = _side(record["rejected"], prompt_turns, where, "rejected")
    _pair(chosen, rejected, where, ("chosen", "rejected"))
    return {"messages": chosen, "rejected": rejected}, {"prompt", "chosen", "rejected"}


def _ranked(record: Mapping[str, Any], where: str) -> list[dict]:
    """Every (better, worse) pair of a ranked list (best first), in the order of the list:
    n answers give n(n-1)/2 examples, each like a prompt/chosen/rejected row's."""
    if "chosen" in record or "rejected" in record:
        both = "chosen" if "chosen" in record else "rejected"
        raise DataError(
            f"{where}: fields '{RANKED}' and '{both}' are both set (format preference reads either"
            f" prompt/chosen/rejected or prompt/{RANKED})"
        )
    answers = record[RANKED]
    if not isinstance(answers, list):
        raise DataError(
            f"{where}: field '{RANKED}' must be a list of answers ranked best first (strings or message lists),"
            f" got {json_type(answers)}"
        )
    if len(answers) < 2:
        raise DataError(
            f"{where}: field '{RANKED}' has {len(answers)} answer (a ranked list needs at least two, best first)"
        )
    prompt_turns = _prompt_turns(record, where)
    chats = [_side(a, prompt_turns, where, f"{RANKED}[{i}]") for i, a in enumerate(answers)]
    rest = {k: v for k, v in record.items() if k not in ("prompt", RANKED)}
    examples = []
    for i in range(len(chats)):
        for j in range(i + 1, len(chats)):
            _pair(chats[i], chats[j], where, (f"{RANKED}[{i}]", f"{RANKED}[{j}]"))
            examples.append({**rest, "messages": chats[i], "rejected": chats[j],
                             "_where": f"{where} ({RANKED}[{i}] over {RANKED}[{j}])"})
    return examples


_CONVERTERS = {
    "alpaca": _alpaca,
    "messages": _messages,
    "completion": _completion,
    "text": _text,
    "classification": _classification,
    "preference": _preference,
}
