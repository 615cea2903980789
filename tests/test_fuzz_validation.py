"""Property-based checks of the validation: whatever bad override or bad data row hypothesis makes
up, the answer is an ``FtlabError`` whose message is one line naming the offending key or field,
never another exception (a traceback). In-process, no model loaded, modest example counts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import string
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from ftlab.config import compose
from ftlab.data.formats import to_examples
from ftlab.data.sources import read_rows
from ftlab.errors import DataError, FtlabError
from ftlab.overrides import inventory
from ftlab.registry import get_registry
from ftlab.schema import RunConfig, Spec, spec_of

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ftlab-hypothesis")  # its caches stay out of the repository
EXAMPLES = int(os.environ.get("FTLAB_FUZZ_EXAMPLES", "25"))  # more for a longer hunt: FTLAB_FUZZ_EXAMPLES=500
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
BASE = ["model=tiny"]
METHODS = ("lora", "dpo", "grpo", "ppo", "adapter", "prompt", "vera", "freeze")
RESERVED = {"true", "false", "null", "nan", "inf", "yes", "no", "on", "off", "y", "n"}


def _specs() -> list[tuple[list[str], str, Spec]]:
    """(group choice, dotted key, spec) of every field with a spec: the YAML groups' and some methods'."""
    out: list[tuple[list[str], str, Spec]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(hints.get(f.name)):
                walk(hints[f.name], key + ".")
            elif key in inventory().keys or key.count(".") == 0:
                out.append(([], key, spec_of(cls, f.name)))

    walk(RunConfig, "")
    registry = get_registry()
    for method in METHODS:
        config = registry.methods[method].cls.Config
        for f in dataclasses.fields(config):
            if f.name != "name":
                out.append(([f"method={method}"], f"method.{f.name}", spec_of(config, f.name)))
    return out


SPECS = _specs()


def _numeric(hint: typing.Any) -> type | None:
    """int or float when the field holds numbers (optionally null), else None."""
    members = {m for m in typing.get_args(hint) or (hint,) if m is not type(None)}
    return members.pop() if len(members) == 1 and members <= {int, float} else None


def _assert_one_line_naming(error: BaseException, *names: str) -> None:
    text = str(error)
    assert "\n" not in text, text
    assert any(name in text for name in names), (names, text)


def _refused(overrides: list[str], *names: str) -> None:
    with pytest.raises(FtlabError) as err:
        compose([*BASE, *overrides])
    _assert_one_line_naming(err.value, *names)


words = st.text(string.ascii_lowercase, min_size=2, max_size=8).filter(lambda w: w not in RESERVED)


# -- bad types -------------------------------------------------------------------------------------------------

TYPED = [(c, k, s) for c, k, s in SPECS if _numeric(s.hint) or s.hint is bool]


@SETTINGS
@given(st.sampled_from(TYPED), words)
def test_a_value_of_the_wrong_type_is_one_line_naming_the_key(entry, word) -> None:
    choice, key, spec = entry
    _refused([*choice, f"{key}={word}"], key)


# -- numbers out of range --------------------------------------------------------------------------------------

RANGED = [(c, k, s) for c, k, s in SPECS if _numeric(s.hint) and s.ranged]


@st.composite
def out_of_range(draw):
    choice, key, spec = draw(st.sampled_from(RANGED))
    if _numeric(spec.hint) is int:
        below = [st.integers(max_value=math.ceil(spec.min) - 1, min_value=-10**9)] if spec.min is not None else \
            [st.integers(max_value=math.floor(spec.gt), min_value=-10**9)] if spec.gt is not None else []
        top = math.floor(spec.max) + 1 if spec.max is not None else math.ceil(spec.lt) if spec.lt is not None else None
        above = [st.integers(min_value=top, max_value=top + 10**9)] if top is not None else []
    else:
        floats = dict(allow_nan=False, allow_infinity=False)
        below = [st.floats(max_value=spec.min, exclude_max=True, min_value=-1e12, **floats)] if spec.min is not None \
            else [st.floats(max_value=spec.gt, min_value=-1e12, **floats)] if spec.gt is not None else []
        above = [st.floats(min_value=spec.max, exclude_min=True, max_value=1e12, **floats)] if spec.max is not None \
            else [st.floats(min_value=spec.lt, max_value=1e12, **floats)] if spec.lt is not None else []
    value = draw(st.one_of(*below, *above).filter(lambda v: spec.problem(v) is not None))
    return choice, key, value


@SETTINGS
@given(out_of_range())
def test_a_number_out_of_its_range_is_one_line_naming_the_key(case) -> None:
    choice, key, value = case
    _refused([*choice, f"{key}={value!r}"], key)


# -- misspelt keys ---------------------------------------------------------------------------------------------

GROUP_KEYS = sorted(k for k in inventory().keys if k.split(".")[0] in ("trainer", "data", "eval", "model", "scheduler")
                    and not k.rpartition(".")[2].startswith("_") and k not in inventory().opaque)
ROOT_KEYS = ["seed", "task_name", "save_model", "resume", "objective"]
METHOD_FIELDS = {m: get_registry().methods[m].field_names for m in METHODS}


@st.composite
def misspelt(draw):
    method = draw(st.sampled_from(METHODS))
    key = draw(st.sampled_from([*GROUP_KEYS, *ROOT_KEYS, *(f"method.{f}" for f in METHOD_FIELDS[method])]))
    parent, _, leaf = key.rpartition(".")
    i = draw(st.integers(0, len(leaf) - 1))
    letter = draw(st.sampled_from(string.ascii_lowercase))
    edit = draw(st.sampled_from(["drop", "insert", "replace", "swap"]))
    if edit == "drop":
        new = leaf[:i] + leaf[i + 1:]
    elif edit == "insert":
        new = leaf[:i] + letter + leaf[i:]
    elif edit == "replace":
        new = leaf[:i] + letter + leaf[i + 1:]
    else:
        new = leaf[:i] + leaf[i + 1:i + 2] + leaf[i] + leaf[i + 2:] if i + 1 < len(leaf) else leaf[::-1]
    wrong = f"{parent}.{new}" if parent else new
    valid = set(METHOD_FIELDS[method]) if parent == "method" else inventory().keys
    if len(new) < 2 or not new[0].isalpha() or (new if parent == "method" else wrong) in valid or new == "name":
        wrong = f"{parent}.{leaf}xq" if parent else f"{leaf}xq"
        new = f"{leaf}xq"
    return method, wrong, new


@SETTINGS
@given(misspelt())
def test_a_misspelt_key_is_one_line_naming_it(case) -> None:
    method, wrong, leaf = case
    _refused([f"method={method}", f"{wrong}=1"], wrong, f"'{leaf}'")


# -- bad choices -------------------------------------------------------------------------------------------------

CHOSEN = [(c, k, s) for c, k, s in SPECS if s.choices is not None]
GROUPS = sorted(g for g in inventory().groups if g not in ("paths",))


@SETTINGS
@given(st.sampled_from(CHOSEN), words)
def test_a_value_not_among_the_choices_is_one_line_naming_the_key(entry, word) -> None:
    choice, key, spec = entry
    if word in spec.choices:
        word += "x"
    _refused([*choice, f"{key}={word}"], key)


@SETTINGS
@given(st.sampled_from(GROUPS + ["method"]), words)
def test_an_unknown_group_option_is_one_line_naming_the_group(group, word) -> None:
    if word in inventory().groups.get(group, ()) or word in get_registry().methods or word in get_registry().presets:
        word += "x"
    _refused([f"{group}={word}"], f"{group}={word}", f"'{word}'")


# -- bad data rows -------------------------------------------------------------------------------------------------

GOOD = {
    "alpaca": {"instruction": "Add", "input": "2 3", "output": "5"},
    "completion": {"prompt": "2+3=", "completion": "5"},
    "text": {"text": "some text"},
    "classification": {"text": "some text", "label": "sports"},
    "messages": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    "preference": {"prompt": "p", "chosen": "good", "rejected": "bad"},
}
REQUIRED = {"alpaca": ["instruction", "output"], "completion": ["prompt", "completion"], "text": ["text"],
            "classification": ["text", "label"], "messages": ["messages"],
            "preference": ["prompt", "chosen", "rejected"]}
bad_values = st.one_of(st.none(), st.just(""), st.just("   "), st.booleans(),
                       st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(), max_size=2),
                       st.dictionaries(words, st.integers(), max_size=2))
bad_messages = st.one_of(
    bad_values.filter(lambda v: not isinstance(v, list)),
    st.just([]),
    st.lists(st.fixed_dictionaries({"role": words, "content": st.text(min_size=1)}), min_size=1, max_size=2),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": bad_values}),
             min_size=1, max_size=2),
)


@st.composite
def bad_row(draw):
    fmt = draw(st.sampled_from(sorted(GOOD)))
    row = dict(GOOD[fmt])
    name = draw(st.sampled_from(REQUIRED[fmt]))
    how = draw(st.sampled_from(["drop", "value"]))
    if how == "drop":
        del row[name]
    elif name == "messages":
        row[name] = draw(bad_messages)
    else:
        value = draw(bad_values)
        if name == "label" and isinstance(value, float):
            value += 0.5  # an integer label is a valid class index
        if name in ("chosen", "rejected") and isinstance(value, list) and not value:
            value = None
        row[name] = value
    return fmt, name, row


@SETTINGS
@given(bad_row())
def test_a_bad_data_row_is_one_line_naming_the_field_and_the_line(case) -> None:
    fmt, name, row = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text(json.dumps(GOOD[fmt]) + "\n" + json.dumps(row) + "\n")
        first, second = read_rows(path)
        to_examples(first, fmt)  # the control: the good row reads
        with pytest.raises(DataError) as err:
            to_examples(second, fmt)
    _assert_one_line_naming(err.value, f"'{name}")
    assert f"{path} line 2" in str(err.value)


@SETTINGS
@given(st.text(min_size=1, max_size=30).filter(lambda t: t.strip() and "\n" not in t and "\r" not in t))
def test_a_line_that_is_not_a_json_object_is_one_line_naming_the_line(line) -> None:
    try:
        if isinstance(json.loads(line), dict):
            return
    except ValueError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text(json.dumps(GOOD["text"]) + "\n" + line + "\n", encoding="utf-8")
        with pytest.raises(DataError) as err:
            for row in read_rows(path):
                to_examples(row, "text")
    _assert_one_line_naming(err.value, f"{path} line 2")
