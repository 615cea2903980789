"""Entry-point discovery shared by the plugin groups whose entries are plain callables
(answer checkers, data augmentations).

A plugin that fails to import, is not callable or reuses a name is recorded in ``broken`` with
why, and every other plugin keeps working. Method discovery (``ftlab.registry``) validates far
more than callability and keeps its own loop.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable

__all__ = ["Discovered", "discover_callables"]


@dataclass
class Discovered:
    """What discovery found: usable plugins by name, and plugins that failed to load with why."""

    found: dict[str, Callable] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # entry-point name -> why it is unusable
    kind: str = "plugin"  # what one plugin is called in messages ("checker", "augmentation")

    def describe(self) -> str:
        """The registered names and, if any, the broken plugins with their reasons."""
        text = f"Registered {self.kind}s: " + (", ".join(sorted(self.found)) or "none") + "."
        if self.broken:
            text += f" Broken {self.kind} plugins: " + "; ".join(f"{n} ({r})" for n, r in sorted(self.broken.items()))
        return text


def _not_callable(obj: Any) -> str:
    return f"not callable (got {type(obj).__name__})"


def discover_callables(
    group: str,
    kind: str,
    entry_points: Iterable[metadata.EntryPoint] | None = None,
    *,
    not_callable: Callable[[Any], str] = _not_callable,
) -> Discovered:
    """Load every entry point of ``group`` (or the given ones), in name order; keep going past
    broken ones. ``not_callable`` words the reason for an entry point that loads a non-callable."""
    if entry_points is None:
        entry_points = metadata.entry_points(group=group)
    result = Discovered(kind=kind)
    for ep in sorted(entry_points, key=lambda e: e.name):
        if ep.name in result.found or ep.name in result.broken:
            result.broken[ep.name] = f"duplicate {kind} name '{ep.name}' (from {ep.value})"
            result.found.pop(ep.name, None)
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a plugin's import error must not take ftlab down
            result.broken[ep.name] = f"{ep.value}: {traceback.format_exception_only(type(exc), exc)[-1].strip()}"
            continue
        if not callable(obj):
            result.broken[ep.name] = f"{ep.value}: {not_callable(obj)}"
            continue
        result.found[ep.name] = obj
    return result
