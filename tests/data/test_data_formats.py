"""Tests of turning each row format into the canonical example, and of detecting the format."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftlab.data.formats import FORMATS, detect_format, missing_fields, to_example
from ftlab.data.sources import DataError, Row, read_rows
from ftlab.data.synthetic import generate

W = "train.jsonl line 7"


def _row(**record) -> Row:
    return Row(W, record)


def _raises(message: str):
    return pytest.raises(DataError, match="^" + re.escape(message) + "$")


def _chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


# ---------------------------------------------------------------- each format -> canonical example


def test_alpaca_with_input_and_system() -> None:
    row = _row(instruction="Translate", input="Hallo", output="Hello", system="Be exact.", id=3)
    assert to_example(row, "alpaca") == {
        "messages": _chat(("system", "Be exact."), ("user", "Translate\n\nHallo"), ("assistant", "Hello")),
        "id": 3,
        "_where": W,
    }


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "  "}, {"input": None, "system": None}])
def test_alpaca_without_input(extra: dict) -> None:
    assert to_example(_row(instruction="Say hi", output="hi", **extra), "alpaca")["messages"] == _chat(
        ("user", "Say hi"), ("assistant", "hi")
    )


def test_openai_messages_keep_other_keys() -> None:
    record = generate(1, seed=0)[0]  # the synthetic data: messages + task + answer
    example = to_example(Row(W, record), "messages")
    assert example == {**record, "_where": W}


def test_sharegpt_conversations() -> None:
    row = _row(
        conversations=[
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
            {"from": "user", "value": "q2"},
            {"from": "assistant", "value": "a2"},
        ],
        source="sg",
    )
    assert to_example(row, "messages") == {
        "messages": _chat(("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")),
        "source": "sg",
        "_where": W,
    }


@pytest.mark.parametrize("answer_key", ["completion", "response"])
def test_completion(answer_key: str) -> None:
    assert to_example(_row(prompt="2+2?", **{answer_key: "4"}), "completion") == {
        "messages": _chat(("user", "2+2?"), ("assistant", "4")),
        "_where": W,
    }


def test_text() -> None:
    assert to_example(_row(text="Once upon a time.", meta={"x": 1}), "text") == {
        "text": "Once upon a time.",
        "meta": {"x": 1},
        "_where": W,
    }


@pytest.mark.parametrize(("label", "expected"), [("positive", "positive"), (3, "3"), (0, "0")])
def test_classification(label, expected: str) -> None:
    assert to_example(_row(text="great film", label=label), "classification") == {
        "text": "great film",
        "label": expected,
        "_where": W,
    }


def test_preference_strings() -> None:
    example = to_example(_row(prompt="Capital of France?", chosen="Paris", rejected="Lyon"), "preference")
    assert example == {
        "messages": _chat(("user", "Capital of France?"), ("assistant", "Paris")),
        "rejected": _chat(("user", "Capital of France?"), ("assistant", "Lyon")),
        "_where": W,
    }


def test_preference_message_lists() -> None:
    # answers only (TRL conversational style): the prompt is put in front
    answers_only = _row(prompt="q", chosen=_chat(("assistant", "good")), rejected=_chat(("assistant", "bad")))
    example = to_example(answers_only, "preference")
    assert example["messages"] == _chat(("user", "q"), ("assistant", "good"))
    assert example["rejected"] == _chat(("user", "q"), ("assistant", "bad"))
    # whole conversations (UltraFeedback style): used as they are
    whole = _row(
        prompt="q", chosen=_chat(("user", "q"), ("assistant", "good")), rejected=_chat(("user", "q"), ("assistant", "bad"))
    )
    assert to_example(whole, "preference")["rejected"] == _chat(("user", "q"), ("assistant", "bad"))
    # a prompt given as messages
    listed = _row(prompt=_chat(("system", "s"), ("user", "q")), chosen="good", rejected="bad")
    assert to_example(listed, "preference")["messages"] == _chat(("system", "s"), ("user", "q"), ("assistant", "good"))


def test_csv_classification_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label,lang\ngood film,1,en\nbad film,0,\n")
    rows = read_rows(path)
    assert detect_format(rows, str(path)) == "classification"
    assert [to_example(r, "classification") for r in rows] == [
        {"text": "good film", "label": "1", "lang": "en", "_where": f"{path} row 2"},
        {"text": "bad film", "label": "0", "lang": "", "_where": f"{path} row 3"},
    ]


# ---------------------------------------------------------------- detect_format


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"messages": [], "task": "t", "answer": "a"}, "messages"),
        ({"conversations": []}, "messages"),
        ({"prompt": "p", "completion": "c"}, "completion"),
        ({"prompt": "p", "response": "r"}, "completion"),
        ({"text": "t"}, "text"),
        ({"text": "t", "label": 1}, "classification"),  # more specific than text
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference"),
    ],
)
def test_detect_each_format(record: dict, fmt: str) -> None:
    assert detect_format([Row("s line 1", record), Row("s line 2", record)], "s") == fmt


def test_detect_skips_a_row_missing_a_field() -> None:
    rows = [Row("s line 1", {"instruction": "i"}), Row("s line 2", {"instruction": "i", "output": "o"})]
    assert detect_format(rows, "s") == "alpaca"


def test_detect_ambiguous_asks_for_data_format() -> None:
    rows = [Row("d.jsonl line 1", {"text": "t", "messages": []})]
    with _raises(
        "d.jsonl: cannot tell the data format: the keys of d.jsonl line 1 (messages, text) fit messages, text;"
        " set data.format=messages or data.format=text"
    ):
        detect_format(rows, "d.jsonl")


def test_detect_unknown_keys_lists_what_each_format_needs() -> None:
    rows = [Row("d.csv row 2", {"question": "q", "answer": "a"}), Row("d.csv row 3", {"question": "q", "id": 1})]
    with _raises(
        "d.csv: no data format fits the keys found (question, answer, id):"
        " alpaca needs instruction, output; input and system are optional;"
        " messages needs messages (a list of {role, content}) or conversations (ShareGPT: a list of {from, value});"
        " completion needs prompt, completion (or response); text needs text; classification needs text, label;"
        " preference needs prompt, chosen, rejected; or prompt, responses (answers ranked best first)."
        " Rename the fields, or set data.format=..."
    ):
        detect_format(rows, "d.csv")


def test_detect_rows_of_different_formats() -> None:
    rows = [Row("m line 1", {"text": "t"}), Row("m line 2", {"prompt": "p", "response": "r"})]
    with _raises(
        "m: rows have different formats (m line 1 is text; m line 2 is completion);"
        " use one format per source, or set data.format=... to read them all as one"
    ):
        detect_format(rows, "m")
    with _raises("m: no rows to detect the data format from"):
        detect_format([], "m")


# ---------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ({"instruction": "i"}, "alpaca", "missing field 'output' (format alpaca needs instruction, output; input and system are optional)"),
        ({"instruction": "i", "output": "  \n"}, "alpaca", "field 'output' is empty (format alpaca needs instruction, output; input and system are optional)"),
        ({"prompt": "p"}, "completion", "missing field 'completion' (format completion needs prompt, completion (or response))"),
        ({"text": ""}, "text", "field 'text' is empty (format text needs text)"),
        ({"text": "t", "label": ""}, "classification", "field 'label' is empty (format classification needs text, label)"),
        ({"text": "t", "label": None}, "classification", "missing field 'label' (format classification needs text, label)"),
        ({"prompt": "p", "chosen": "c"}, "preference", "missing field 'rejected' (format preference needs prompt, chosen, rejected; or prompt, responses (answers ranked best first))"),
        ({"messages": []}, "messages", "field 'messages' is empty (format messages needs messages (a list of {role, content}) or conversations (ShareGPT: a list of {from, value}))"),
    ],
)
def test_missing_or_empty_field(record: dict, fmt: str, message: str) -> None:
    with _raises(f"{W}: {message}"):
        to_example(_row(**record), fmt)


@pytest.mark.parametrize(
    ("record", "fmt", "message"),
    [
        ({"instruction": "i", "output": 4}, "alpaca", "field 'output' must be a string, got number"),
        ({"instruction": "i", "output": "o", "input": ["x"]}, "alpaca", "field 'input' must be a string, got array"),
        ({"text": {"a": 1}}, "text", "field 'text' must be a string, got object"),
        ({"text": "t", "label": 0.5}, "classification", "field 'label' must be a string or an integer, got number 0.5"),
        ({"text": "t", "label": True}, "classification", "field 'label' must be a string or an integer, got boolean True"),
        ({"text": "t", "label": ["a"]}, "classification", "field 'label' must be a string or an integer, got array"),
        ({"text": "t", "label": {"a": 1}}, "classification", "field 'label' must be a string or an integer, got object"),
        ({"prompt": "p", "chosen": 1, "rejected": "r"}, "preference", "field 'chosen' must be a string or a list of {role, content}, got number"),
        ({"prompt": "p", "completion": "c", "response": "r"}, "completion", "fields 'completion' and 'response' are both set (format completion reads one)"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "field 'messages[0].content' must be a string, got number"),
        ({"messages": _chat(("user", "q"))}, "messages", "field 'messages[0].role' is 'user' (expected the last message to be from the assistant)"),
    ],
)
def test_wrong_type(record: dict, fmt: str, message: str) -> None:
    with _raises(f"{W}: {message}"):
        to_example(_row(**record), fmt)


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        (
            [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}],
            "field 'conversations[1].from' is 'bot' (expected one of human, gpt, system, user, assistant)",
        ),
        ([{"value": "q"}], "missing field 'conversations[0].from' (expected one of human, gpt, system, user, assistant)"),
        ([{"from": "gpt"}], "missing field 'conversations[0].value' (expected a string)"),
        ([{"from": "gpt", "value": 1}], "field 'conversations[0].value' must be a string, got number"),
        (
            [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],
            "field 'conversations[1].from' is 'human' (expected the last turn to be from gpt or assistant)",
        ),
        ("hi", "field 'conversations' must be a list of {from, value} objects, got string"),
    ],
)
def test_sharegpt_errors(turns, message: str) -> None:
    with _raises(f"{W}: {message}"):
        to_example(_row(conversations=turns), "messages")


def test_unknown_format_and_missing_fields() -> None:
    with _raises("data.format: unknown format 'chat' (expected one of " + ", ".join(FORMATS) + ")"):
        to_example(_row(text="t"), "chat")
    assert missing_fields({"instruction": " ", "input": ""}, "alpaca") == ["instruction", "output"]
    assert missing_fields({"prompt": "p", "response": "r"}, "completion") == []
    assert missing_fields({"text": "t", "label": 0}, "classification") == []
