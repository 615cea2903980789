"""Tests of preparation (normalize, missing fields, dedup, length, augmentation) and its report."""

from __future__ import annotations

import copy
import random
import re
from importlib import metadata

import pytest

from ftlab.data.augment import ENTRY_POINT_GROUP, discover_augmentations, typos
from ftlab.data.prepare import PrepareConfig, PrepReport, drop_by_length, normalize_text, prepare
from ftlab.data.sources import DataError, Row
from ftlab.data.synthetic import generate


def _raises(message: str):
    return pytest.raises(DataError, match="^" + re.escape(message))


def _rows(records: list[dict], name: str = "d.jsonl") -> list[Row]:
    return [Row(f"{name} line {i}", r) for i, r in enumerate(records, start=1)]


def _prep(records: list[dict], fmt: str = "alpaca", train: bool = False, seed: int = 0, **cfg):
    return prepare(_rows(records), fmt, PrepareConfig(**cfg), source="d.jsonl", seed=seed, train=train)


def _consistent(report: PrepReport) -> bool:
    return report.rows - sum(report.dropped.values()) + report.expanded + report.augmented == report.kept


# ---------------------------------------------------------------- whitespace


def test_normalize_text() -> None:
    assert normalize_text("  a \t b  \r\nc   d \n\n  def f():\n      return 1  \n") == (
        "a b\nc d\n\n  def f():\n      return 1"
    )
    assert normalize_text("Cafe\u0301") == "Caf\u00e9"  # NFC


def test_whitespace_normalized_in_every_string_field() -> None:
    record = {
        "messages": [{"role": "user ", "content": " What  is\r\n2 +\t2? "}, {"role": "assistant", "content": "4 \n"}],
        "answer": " 4",
    }
    examples, _ = _prep([record], fmt="messages")
    assert examples == [
        {
            "messages": [{"role": "user", "content": "What is\n2 + 2?"}, {"role": "assistant", "content": "4"}],
            "answer": "4",
            "_where": "d.jsonl line 1",
        }
    ]
    raw = {**record, "messages": [{**record["messages"][0], "role": "user"}, record["messages"][1]]}
    kept, _ = _prep([raw], fmt="messages", normalize_whitespace=False)
    assert kept[0]["answer"] == " 4" and kept[0]["messages"][0]["content"] == " What  is\r\n2 +\t2? "


# ---------------------------------------------------------------- missing fields

ROWS = [
    {"instruction": "a", "output": "1"},
    {"instruction": "b", "output": "  "},  # empty after stripping = missing
    {"instruction": "c"},
    {"instruction": "d", "output": "4"},
    {"output": "5"},
]


def test_missing_error_names_the_row_and_field() -> None:
    with _raises(
        "d.jsonl line 2: field 'output' is empty (format alpaca needs instruction, output; input and system are optional)"
    ):
        _prep(ROWS)
    with _raises(
        "d.jsonl line 1: missing field 'output' (format alpaca needs instruction, output; input and system are optional)"
    ):
        _prep(ROWS[2:])


def test_missing_drop_counts_reasons() -> None:
    examples, report = _prep(ROWS, missing="drop")
    assert [e["_where"] for e in examples] == ["d.jsonl line 1", "d.jsonl line 4"]
    assert report.dropped == {"missing field 'output'": 2, "missing field 'instruction'": 1}
    assert (report.rows, report.kept, report.filled) == (5, 2, {})
    assert _consistent(report)


def test_missing_fill_uses_the_value_and_counts() -> None:
    examples, report = _prep(ROWS, missing="fill", fill={"output": "N/A", "instruction": "Respond."})
    assert [e["messages"][-1]["content"] for e in examples] == ["1", "N/A", "N/A", "4", "5"]
    assert examples[4]["messages"][0]["content"] == "Respond."
    assert report.filled == {"output": 2, "instruction": 1} and report.kept == 5
    with _raises(
        "d.jsonl line 5: missing field 'instruction' (format alpaca needs instruction, output; input and system"
        " are optional); data.prepare.fill has no value for 'instruction'"
    ):
        _prep(ROWS, missing="fill", fill={"output": "N/A"})


def test_every_row_dropped_is_an_error() -> None:
    with _raises("d.jsonl: every row was dropped (1 missing field 'output')"):
        _prep([{"instruction": "x"}], missing="drop")


# ---------------------------------------------------------------- dedup and length


def test_dedup_after_normalization_keeps_the_first() -> None:
    records = [
        {"text": "a  b"},
        {"text": "a b "},  # the same after normalization
        {"text": "c"},
        {"text": "a b"},
        {"text": "a b", "source": "other"},  # other keys make it a different example
    ]
    examples, report = _prep(records, fmt="text")
    assert [e["_where"] for e in examples] == ["d.jsonl line 1", "d.jsonl line 3", "d.jsonl line 5"]
    assert report.dropped == {"duplicate": 2} and report.kept == 3
    assert len(_prep(records, fmt="text", dedup=False)[0]) == 5


def test_drop_by_length_counts_and_reasons() -> None:
    examples, report = _prep([{"text": str(i)} for i in range(6)], fmt="text")
    kept = drop_by_length(examples, [1, 5, 9, 10, 11, 50], min_tokens=5, max_tokens=10, report=report)
    assert [e["text"] for e in kept] == ["1", "2", "3"]
    assert report.dropped == {"too short (< 5 tokens)": 1, "too long (> 10 tokens)": 2}
    assert report.kept == 3 and _consistent(report)
    assert len(drop_by_length(kept, [1, 100, 1000], 0, None, report)) == 3
    with _raises("d.jsonl: every example was dropped ("):
        drop_by_length(kept, [1, 1, 1], 2, None, report)


def test_report_dict_and_lines() -> None:
    _, report = _prep(ROWS + [ROWS[0]], missing="drop")
    assert report.as_dict() == {
        "source": "d.jsonl",
        "rows": 6,
        "dropped": {"missing field 'output'": 2, "missing field 'instruction'": 1, "duplicate": 1},
        "filled": {},
        "ranked_rows": 0,
        "expanded": 0,
        "augmented": 0,
        "kept": 2,
        "truncated": 0,
    }
    assert report.lines() == [
        "d.jsonl: 6 rows read, 2 examples kept",
        "d.jsonl: dropped 2 rows: missing field 'output'",
        "d.jsonl: dropped 1 row: missing field 'instruction'",
        "d.jsonl: dropped 1 row: duplicate",
    ]


# ---------------------------------------------------------------- augmentation


def test_typos_is_registered_through_the_entry_point() -> None:
    assert discover_augmentations().found["typos"] is typos


def test_augmentation_is_seeded_and_only_touches_user_turns() -> None:
    records = generate(20, seed=1)
    a, report = _prep(records, fmt="messages", train=True, seed=5, augment=["typos"], augment_ratio=0.5)
    b, _ = _prep(records, fmt="messages", train=True, seed=5, augment=["typos"], augment_ratio=0.5)
    c, _ = _prep(records, fmt="messages", train=True, seed=6, augment=["typos"], augment_ratio=0.5)
    assert a == b and a != c
    assert len(a) == 20 + 10 and report.augmented == 10 and report.kept == 30 and _consistent(report)
    assert "d.jsonl: added 10 augmented copies" in report.lines()
    originals = {e["_where"]: e for e in a[:20]}
    for copy_ in a[20:]:
        where = copy_["_where"].removesuffix(" (augmented: typos)")
        original = originals[where]
        (user, answer), (orig_user, orig_answer) = copy_["messages"], original["messages"]
        assert answer == orig_answer and copy_["answer"] == original["answer"] and copy_["task"] == original["task"]
        assert user["content"] != orig_user["content"]
        assert sorted(user["content"]) == sorted(orig_user["content"])  # letters swapped, none added or lost
        # numbers, emails and the answer's words are unchanged, so the answer is still right
        assert re.findall(r"\d+|\S+@\S+", user["content"]) == re.findall(r"\d+|\S+@\S+", orig_user["content"])
        for word in re.findall(r"[^\W\d_]+", answer["content"]):
            assert re.findall(rf"\b{word}\b", user["content"], re.I) == re.findall(rf"\b{word}\b", orig_user["content"], re.I)


@pytest.mark.parametrize(("ratio", "expected"), [(0.0, 0), (0.3, 3), (0.75, 8), (1.0, 10)])
def test_augmentation_adds_round_ratio_n_on_train_only(ratio: float, expected: int) -> None:
    records = [{"text": f"the quick brown fox number {i} jumps", "label": "x"} for i in range(10)]
    train, report = _prep(records, fmt="classification", train=True, augment=["typos"], augment_ratio=ratio)
    assert len(train) == 10 + expected and report.augmented == expected
    assert all(e["label"] == "x" for e in train)
    val, val_report = _prep(records, fmt="classification", train=False, augment=["typos"], augment_ratio=ratio)
    assert len(val) == 10 and val_report.augmented == 0


def test_typos_copies_and_touches_what_the_user_wrote() -> None:
    example = {
        "messages": [
            {"role": "system", "content": "Answer the question precisely"},
            {"role": "user", "content": "Please tell me about horses and rivers and clouds quickly"},
            {"role": "assistant", "content": "Horses drink from rivers"},
        ]
    }
    before = copy.deepcopy(example)
    out = typos(example, random.Random(0))
    assert example == before  # the input is never changed
    assert out["messages"][0] == example["messages"][0] and out["messages"][2] == example["messages"][2]
    user = out["messages"][1]["content"]
    changed = [w for w, o in zip(user.split(), example["messages"][1]["content"].split()) if w != o]
    assert len(changed) == 1  # 10% of 10 words
    assert "horses" in user and "rivers" in user  # words of the answer are kept
    assert typos(example, random.Random(0)) == out
    assert typos({"text": "a great movie indeed"}, random.Random(0))["text"] != "a great movie indeed"
    assert typos({"messages": [{"role": "user", "content": "12 + 30"}, {"role": "assistant", "content": "42"}]},
                 random.Random(0)) is None  # nothing a typo could go into
    assert typos({"other": 1}, random.Random(0)) is None


def test_preference_rejected_gets_the_same_user_typos() -> None:
    records = [{"prompt": "Describe the weather outside today", "chosen": "Sunny", "rejected": "Rain"}]
    examples, _ = _prep(records, fmt="preference", train=True, augment=["typos"])
    augmented = examples[1]
    assert augmented["messages"][0] == augmented["rejected"][0] != examples[0]["messages"][0]
    assert augmented["rejected"][1]["content"] == "Rain"


# ---------------------------------------------------------------- config


def test_config_from_any_and_its_errors() -> None:
    from omegaconf import OmegaConf

    cfg = PrepareConfig.from_any(OmegaConf.create({"missing": "fill", "fill": {"input": ""}, "augment": ["typos"]}))
    assert cfg == PrepareConfig(missing="fill", fill={"input": ""}, augment=["typos"])
    assert PrepareConfig.from_any(None) == PrepareConfig()
    with _raises("data.prepare.dedupe: unknown field (known: normalize_whitespace, missing, fill, dedup, augment, augment_ratio)"):
        PrepareConfig.from_any({"dedupe": False})
    with _raises("data.prepare.missing must be one of error, drop, fill, got 'skip'"):
        PrepareConfig.from_any({"missing": "skip"})
    with _raises("data.prepare.augment_ratio must be a number in [0, 1], got 1.5"):
        PrepareConfig.from_any({"augment_ratio": 1.5})
    with _raises("data.prepare.fill must map field names to strings, got {'output': 3}"):
        PrepareConfig.from_any({"fill": {"output": 3}})
    with _raises("data.prepare.augment: unknown augmentation 'typo'. Installed augmentations: typos"):
        PrepareConfig.from_any({"augment": ["typo"]})


def test_broken_plugin_is_reported_by_name() -> None:
    eps = [
        metadata.EntryPoint("typos", "ftlab.data.augment:typos", ENTRY_POINT_GROUP),
        metadata.EntryPoint("shout", "no_such_module_ftlab:shout", ENTRY_POINT_GROUP),
        metadata.EntryPoint("plain", "ftlab.data.augment:ENTRY_POINT_GROUP", ENTRY_POINT_GROUP),
    ]
    found = discover_augmentations(eps)
    assert list(found.found) == ["typos"]
    assert found.broken == {
        "plain": "ftlab.data.augment:ENTRY_POINT_GROUP: not callable (got str 'ftlab.augmentations')",
        "shout": "no_such_module_ftlab:shout: ModuleNotFoundError: No module named 'no_such_module_ftlab'",
    }
