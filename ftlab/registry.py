"""Method discovery through the ``ftlab.methods`` entry-point group, and ConfigStore registration.

Built-in methods are declared in ftlab's own pyproject and travel the same path as third-party
ones. A plugin that fails to import (or breaks the contract) is recorded with its reason and
left out; every other method keeps working.
"""

from __future__ import annotations

import dataclasses
import re
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable, List, Sequence

from hydra.core.config_store import ConfigStore

from ftlab.config import method_presets
from ftlab.errors import MethodError
from ftlab.method import BaseMethod, MethodConfig, config_fields, field_default

ENTRY_POINT_GROUP = "ftlab.methods"
METHOD_GROUP = "method"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass
class MethodInfo:
    name: str
    cls: type[BaseMethod]
    package: str
    version: str
    config_node: type[MethodConfig]

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in config_fields(self.cls.Config)]


@dataclass
class Registry:
    methods: dict[str, MethodInfo] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # entry-point name -> reason

    def get(self, name: str) -> MethodInfo:
        if name in self.methods:
            return self.methods[name]
        if name in self.broken:
            raise MethodError(f"method '{name}' is installed but could not be loaded: {self.broken[name]}")
        raise MethodError(f"unknown method '{name}'. {self.describe_installed()}")

    def describe_installed(self) -> str:
        text = "Installed methods: " + ", ".join(sorted(self.methods)) + "."
        if self.broken:
            text += " Broken plugins: " + "; ".join(f"{n} ({r})" for n, r in sorted(self.broken.items()))
        return text

    def check_field(self, method: str, key: str) -> None:
        """Raise a MethodError naming ``key`` and the valid fields when ``method`` has no such field."""
        info = self.get(method)
        top = key.split(".", 1)[0]
        if top != "name" and top not in info.field_names:
            raise MethodError(
                f"method '{method}' has no field '{top}'. Valid fields: {', '.join(info.field_names)}"
            )


def _config_node(name: str, cls: type[BaseMethod]) -> type[MethodConfig]:
    """A subclass of the method's Config whose ``name`` is the entry-point name and whose Hydra
    defaults list carries the method's choices in other groups (e.g. qlora -> quantization=nf4)."""
    extra: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    if cls.defaults:
        entries = [*cls.defaults, "_self_"]
        extra.append(("defaults", List[Any], field(default_factory=lambda: list(entries))))
    node = dataclasses.make_dataclass(cls.Config.__name__, extra, bases=(cls.Config,))
    node.__module__, node.__qualname__ = cls.Config.__module__, cls.Config.__qualname__
    return node


def _validate(name: str, obj: Any) -> type[BaseMethod]:
    if not _NAME.match(name):
        raise MethodError(f"entry-point name '{name}' must be lowercase letters, digits and '_'")
    if not isinstance(obj, type) or not callable(getattr(obj, "apply", None)):
        raise MethodError(f"'{name}' must point at a method class with an apply(model) method, got {obj!r}")
    config = getattr(obj, "Config", None)
    if not (isinstance(config, type) and issubclass(config, MethodConfig) and dataclasses.is_dataclass(config)):
        raise MethodError(f"'{name}': {obj.__name__}.Config must be a dataclass subclassing ftlab.method.MethodConfig")
    for f in config_fields(config):
        field_default(f)  # a field without a default is allowed ('???' = required)
    return obj


def discover(entry_points: Iterable[metadata.EntryPoint] | None = None) -> Registry:
    """Load every method entry point; keep going past broken ones."""
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points)
    registry = Registry()
    for ep in sorted(eps, key=lambda e: e.name):
        if ep.name in registry.methods or ep.name in registry.broken:
            registry.broken[ep.name] = f"duplicate method name '{ep.name}' (from {ep.value})"
            registry.methods.pop(ep.name, None)
            continue
        try:
            cls = _validate(ep.name, ep.load())
        except Exception as exc:  # a plugin's import error must not take ftlab down
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            registry.broken[ep.name] = f"{ep.value}: {last}"
            continue
        dist = getattr(ep, "dist", None)
        registry.methods[ep.name] = MethodInfo(
            name=ep.name,
            cls=cls,
            package=dist.name if dist is not None else ep.value.split(".")[0],
            version=dist.version if dist is not None else "",
            config_node=_config_node(ep.name, cls),
        )
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """Discover once per process and store every method's node in Hydra's ConfigStore."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = discover()
        register(_REGISTRY)
    return _REGISTRY


def register(registry: Registry) -> None:
    cs = ConfigStore.instance()
    for info in registry.methods.values():
        cs.store(group=METHOD_GROUP, name=info.name, node=info.config_node, provider=info.package)


def check_overrides(overrides: Sequence[str], default_method: str, registry: Registry | None = None) -> None:
    """Fail early, with the valid choices, on an unknown method or a misspelt ``method.FIELD``.

    Hydra alone reports a bad field as "Key 'rr' is not in struct"; this names the method and
    lists its fields. Sweep values (``method=lora,qlora``) are each checked.
    """
    registry = registry or get_registry()
    methods = [default_method]
    keys: list[str] = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~", "hydra.")):
            continue
        if key == METHOD_GROUP:
            methods = _sweep_values(value)
        elif key.startswith(METHOD_GROUP + "."):
            keys.append(key[len(METHOD_GROUP) + 1:])
    for method in methods:
        if method not in registry.methods and method in method_presets():
            continue  # a YAML preset extending a registered node: Hydra checks its fields
        registry.get(method)
        for key in keys:
            registry.check_field(method, key)


def _sweep_values(value: str) -> list[str]:
    value = value.strip()
    if value.startswith(("choice(", "glob(", "range(", "interval(")):
        return []  # sweeper functions: leave them to Hydra
    return [v.strip() for v in value.split(",") if v.strip()]
