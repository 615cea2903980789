"""Entry-point discovery and lookup by name, shared by every plugin group: methods
(``ftlab.registry``), answer checkers (``ftlab.evaluation.checkers``) and data augmentations
(``ftlab.data.augment``).

Each group's entry points are loaded in name order and passed through the group's validation.
A plugin that fails to import, fails that validation or reuses a name is recorded in ``broken``
with why, and every other plugin keeps working. A lookup by a name that is not usable raises the
group's error class, naming what is installed and what is broken.

Only the standard library and ``ftlab.errors`` are imported here, so the light groups (checkers,
augmentations) do not pull in the method machinery (torch, Hydra).
"""

from __future__ import annotations

import reprlib
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Generic, Iterable, TypeVar

from ftlab.errors import FtlabError

__all__ = ["Discovered", "callable_plugin", "discover_group", "load_failure"]

T = TypeVar("T")


@dataclass
class Discovered(Generic[T]):
    """What discovery of one group found: usable plugins by name, and plugins that failed to load
    with why. ``get`` is the one lookup by name every group uses."""

    kind: str  # what one plugin is called in messages ("method", "checker", "augmentation")
    error: type[FtlabError]  # what a failed lookup raises
    found: dict[str, T] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # entry-point name -> why it is unusable

    def get(self, name: str, where: str = "") -> T:
        """The plugin registered as ``name``; otherwise the group's error, saying that it is
        installed but broken (and why), or that it is unknown (and what is installed and broken).
        ``where`` (e.g. the config key that named it) starts the message."""
        if name in self.found:
            return self.found[name]
        prefix = f"{where}: " if where else ""
        if name in self.broken:
            raise self.error(f"{prefix}{self.kind} '{name}' is installed but could not be loaded: {self.broken[name]}")
        raise self.error(f"{prefix}unknown {self.kind} '{name}'. {self.describe()}")

    def describe(self) -> str:
        """The installed names and, if any, the broken plugins with their reasons."""
        text = " ".join(self._installed())
        if self.broken:
            text += " Broken plugins: " + "; ".join(f"{n} ({r})" for n, r in sorted(self.broken.items()))
        return text

    def _installed(self) -> list[str]:
        """The sentences that list what can be used (a group with more to list extends them)."""
        return [f"Installed {self.kind}s: " + (", ".join(sorted(self.found)) or "none") + "."]


def load_failure(ep: metadata.EntryPoint, exc: BaseException) -> str:
    """Why ``ep`` is unusable: a validation error's message, or the exception's type and message
    (``ModuleNotFoundError: No module named ...``) for anything else, after the entry point."""
    if isinstance(exc, FtlabError):
        return f"{ep.value}: {exc}"
    return f"{ep.value}: {traceback.format_exception_only(type(exc), exc)[-1].strip()}"


def callable_plugin(ep: metadata.EntryPoint, obj: Any) -> Callable:
    """The validation of groups whose entries are plain callables (checkers, augmentations)."""
    if not callable(obj):
        raise FtlabError(f"not callable (got {type(obj).__name__} {reprlib.repr(obj)})")
    return obj


def discover_group(
    group: str,
    kind: str,
    error: type[FtlabError],
    validate: Callable[[metadata.EntryPoint, Any], T] = callable_plugin,
    entry_points: Iterable[metadata.EntryPoint] | None = None,
) -> Discovered[T]:
    """Load every entry point of ``group`` (or the given ones), in name order, and keep what
    ``validate(entry_point, loaded_object)`` returns; keep going past broken ones.

    ``validate`` raises (an ``FtlabError`` whose message says what is wrong) to reject a plugin.
    A name used twice is unusable: neither entry point is kept, since which one a user gets
    would depend on install order.
    """
    if entry_points is None:
        entry_points = metadata.entry_points(group=group)
    result: Discovered[T] = Discovered(kind, error)
    for ep in sorted(entry_points, key=lambda e: e.name):
        if ep.name in result.found or ep.name in result.broken:
            result.broken[ep.name] = f"duplicate {kind} name '{ep.name}' (from {ep.value})"
            result.found.pop(ep.name, None)
            continue
        try:
            result.found[ep.name] = validate(ep, ep.load())
        except Exception as exc:  # a plugin's import error must not take ftlab down
            result.broken[ep.name] = load_failure(ep, exc)
    return result
