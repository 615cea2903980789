"""Answer checkers: how a generated answer is compared with the reference answer.

Why plugins: what counts as "correct" depends on the data (an exact string, a number, a JSON
object), so a project with its own answer format registers a checker in the entry-point group
``ftlab.checkers`` (name -> ``(prediction, reference) -> bool``) instead of patching ftlab.
The built-ins below are declared in ftlab's own pyproject and travel the same path; a plugin
that fails to import is reported with its error and every other checker keeps working.
"""

from __future__ import annotations

import json
import re
from importlib import metadata
from typing import Any, Callable, Iterable

from ftlab.data.synthetic import exact_match
from ftlab.errors import ConfigError
from ftlab.plugins import Discovered, discover_group

__all__ = [
    "ENTRY_POINT_GROUP", "Checker", "discover_checkers", "exact", "get_checker", "json_equal", "normalized", "number",
]

ENTRY_POINT_GROUP = "ftlab.checkers"

Checker = Callable[[str, str], bool]

# ``exact`` is the synthetic data's own notion of a correct answer, so both always agree.
exact: Checker = exact_match


def _normalize(text: str) -> str:
    text = " ".join(text.split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def normalized(prediction: str, reference: str) -> bool:
    """Equal up to case, runs of whitespace and a trailing period: forgives a chat model's
    sentence style ("Paris." for "paris") but not a different answer."""
    return _normalize(prediction) == _normalize(reference)


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def _as_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def number(prediction: str, reference: str) -> bool:
    """The first number in the prediction equals the reference number ("The answer is 42." for
    "42"): scores arithmetic answers without demanding the exact output format."""
    expected = _as_number(reference)
    return expected is not None and _as_number(prediction) == expected


def _json_same(a: Any, b: Any) -> bool:
    """Structural equality that keeps JSON's types apart (Python says ``True == 1 == 1.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return False
    return a == b


def json_equal(prediction: str, reference: str) -> bool:
    """Both parse as JSON and hold the same value: key order and spacing do not matter."""
    try:
        return _json_same(json.loads(prediction), json.loads(reference))
    except (ValueError, TypeError):
        return False


def discover_checkers(entry_points: Iterable[metadata.EntryPoint] | None = None) -> Discovered[Checker]:
    """Every ``ftlab.checkers`` entry point (or the given ones): usable checkers in ``found``,
    broken plugins with why in ``broken``; a lookup by name raises ConfigError."""
    return discover_group(ENTRY_POINT_GROUP, "checker", ConfigError, entry_points=entry_points)


def get_checker(name: str) -> Checker:
    """The checker registered as ``name``; a ConfigError that lists the valid names otherwise."""
    return discover_checkers().get(name)
