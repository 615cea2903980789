"""Method discovery through entry points, and ConfigStore registration.

Two groups: ``ftlab.methods`` (name = a method class) and ``ftlab.presets`` (value = a package
whose ``*.yaml`` files are presets: a defaults list that starts from a registered method, plus
the fields it sets, e.g. ``lora_r64``). Built-in methods and presets are declared in ftlab's own
pyproject and travel the same path as third-party ones. A plugin that fails to import (or breaks
the contract) is recorded with its reason and left out; every other method keeps working. The
loading loop and the lookup by name are ``ftlab.plugins``'s, shared with checkers and augmentations;
what is method-specific here is the validation (``_method_info``), presets and the ConfigStore.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import Any, Iterable, List, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ftlab.errors import FtlabError, MethodError
from ftlab.methods.base import BaseMethod, MethodConfig, config_fields, field_default
from ftlab.plugins import Discovered, discover_group, load_failure

ENTRY_POINT_GROUP = "ftlab.methods"
PRESET_GROUP = "ftlab.presets"
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
class PresetInfo:
    """A YAML preset of the ``method`` group that starts from a registered method's node."""

    name: str
    base: str  # the registered method it starts from
    package: str
    version: str
    summary: str  # the file's first comment line
    node: DictConfig  # stored in the ConfigStore as it is: defaults list + the fields it sets

    @property
    def values(self) -> dict[str, Any]:
        return {k: v for k, v in OmegaConf.to_container(self.node).items() if k != "defaults"}


@dataclass
class Registry(Discovered[MethodInfo]):
    """The discovered methods (``found``, also as ``methods``), presets, and broken plugins; entry
    points and presets that failed are both in ``broken``."""

    kind: str = "method"
    error: type[FtlabError] = MethodError
    presets: dict[str, PresetInfo] = field(default_factory=dict)

    @property
    def methods(self) -> dict[str, MethodInfo]:
        return self.found

    def get(self, name: str, where: str = "") -> MethodInfo:
        """The method ``name`` selects: itself, or the method a preset starts from."""
        if name in self.presets:
            return self.found[self.presets[name].base]
        return super().get(name, where)

    def _installed(self) -> list[str]:
        presets = [f"Presets: {', '.join(sorted(self.presets))}."] if self.presets else []
        return super()._installed() + presets

    def check_field(self, method: str, key: str) -> None:
        """Raise a MethodError naming ``key``, the valid fields and the closest one when ``method``
        has no such field."""
        from ftlab.schema import closest

        info = self.get(method)
        top = key.split(".", 1)[0]
        if top != "name" and top not in info.field_names:
            best = closest(top, info.field_names)
            raise MethodError(
                f"method '{method}' has no field '{top}'. Valid fields: {', '.join(info.field_names)}"
                + (f"; did you mean method.{best}?" if best else "")
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
        raise MethodError(f"'{name}': {obj.__name__}.Config must be a dataclass subclassing ftlab.methods.base.MethodConfig")
    for f in config_fields(config):
        _check_declared_range(name, config, f)
    return obj


def _check_declared_range(name: str, config: type, f: dataclasses.Field) -> None:
    """A field's declared range (``metadata``: min, max, gt, lt, choices, also, check) must be
    well formed, and its default inside it (a required field, '???', and an interpolation,
    '${...}', have none to check)."""
    from ftlab.schema import spec_of

    try:
        spec = spec_of(config, f.name)
    except TypeError as exc:
        raise MethodError(f"'{name}': {exc}") from None
    default = field_default(f)
    if isinstance(default, str) and (default == "???" or "${" in default):
        return
    problem = spec.problem(default)
    if problem:
        raise MethodError(f"'{name}': the default of {config.__name__}.{f.name} ({default!r}) is outside its "
                          f"declared range: expected {problem}")


def _method_info(ep: metadata.EntryPoint, obj: Any) -> MethodInfo:
    """The validation of the ``ftlab.methods`` group: a method class and its config node."""
    cls = _validate(ep.name, obj)
    package, version = _provider(ep)
    return MethodInfo(name=ep.name, cls=cls, package=package, version=version, config_node=_config_node(ep.name, cls))


def _provider(ep: metadata.EntryPoint) -> tuple[str, str]:
    """The distribution that declares ``ep`` and its version (its top-level module and '' when unknown)."""
    dist = getattr(ep, "dist", None)
    return (dist.name, dist.version) if dist is not None else (ep.value.split(".")[0], "")


def discover(
    entry_points: Iterable[metadata.EntryPoint] | None = None,
    preset_entry_points: Iterable[metadata.EntryPoint] | None = None,
) -> Registry:
    """Load every method entry point, then every preset package; keep going past broken ones.

    Passing ``entry_points`` without ``preset_entry_points`` discovers no presets (tests build
    registries from a chosen set of entry points).
    """
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        if preset_entry_points is None:
            preset_entry_points = metadata.entry_points(group=PRESET_GROUP)
    found = discover_group(ENTRY_POINT_GROUP, "method", MethodError, _method_info, entry_points)
    registry = Registry(found=found.found, broken=found.broken)
    for ep in sorted(preset_entry_points or [], key=lambda e: e.name):
        _load_presets(registry, ep)
    return registry


def _load_presets(registry: Registry, ep: metadata.EntryPoint) -> None:
    """Read every ``*.yaml`` of the package ``ep`` points at as a preset of the method group."""
    package, version = _provider(ep)
    try:
        files = sorted((f for f in resources.files(ep.value).iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    except Exception as exc:
        registry.broken[f"presets:{ep.name}"] = load_failure(ep, exc)
        return
    for path in files:
        name = path.name.removesuffix(".yaml")
        try:
            text = path.read_text()
            node = OmegaConf.create(text)
            preset = _preset(name, node, registry)
        except Exception as exc:
            registry.broken[name] = f"preset {ep.value}/{path.name}: {exc}"
            continue
        comments = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")]
        registry.presets[name] = PresetInfo(name, preset, package, version, comments[0] if comments else "", node)


def _preset(name: str, node: Any, registry: Registry) -> str:
    """Check a preset file and return the method it starts from."""
    if not _NAME.match(name):
        raise MethodError(f"preset name '{name}' must be lowercase letters, digits and '_'")
    if name in registry.methods or name in registry.presets:
        raise MethodError(f"preset '{name}' has the name of an installed method or preset")
    defaults = node.get("defaults") if isinstance(node, DictConfig) else None
    first = defaults[0] if defaults else None
    if not isinstance(first, str) or first not in registry.methods:
        raise MethodError(
            f"its defaults list must start with the registered method it extends (one of: {', '.join(sorted(registry.methods))}), "
            f"got {first!r}"
        )
    valid = registry.methods[first].field_names
    for key in node:
        if key != "defaults" and key not in valid:
            raise MethodError(f"'{key}' is not a field of method '{first}'. Valid fields: {', '.join(valid)}")
    return first


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
    for preset in registry.presets.values():
        cs.store(group=METHOD_GROUP, name=preset.name, node=preset.node, provider=preset.package)


def check_overrides(overrides: Sequence[str], default_method: str, registry: Registry | None = None) -> None:
    """Fail early, with the valid choices, on an unknown method, a misspelt ``method.FIELD`` or a
    value a field's type or declared range refuses (``method.lr=-1``), before anything composes.

    Hydra alone reports a bad field as "Key 'rr' is not in struct"; this names the method and
    lists its fields. Every swept method (``method=lora,qlora``) is checked with every swept
    value of every field (``method.r=4,0``). A value of another type than the field's (a string
    for an int) is left to the composition, which converts what OmegaConf converts and reports
    the rest in the same words.
    """
    from ftlab.overrides import parse, sweep_values
    from ftlab.schema import check_value, conforms, spec_at

    registry = registry or get_registry()
    methods = [default_method]
    fields: list[tuple[str, list[Any]]] = []
    for override in parse(overrides):
        key = override.key_or_group
        if override.is_delete() or override.package:
            continue
        if key == METHOD_GROUP:
            methods = [str(v) for v in sweep_values(override) if v is not None]
        elif key.startswith(METHOD_GROUP + "."):
            fields.append((key[len(METHOD_GROUP) + 1:], sweep_values(override)))
    for method in methods:
        info = registry.get(method)  # a preset is checked against the method it starts from
        for key, values in fields:
            registry.check_field(method, key)
            spec = spec_at(f"{METHOD_GROUP}.{key}", info.cls.Config)
            for value in values if spec is not None else []:
                if not (isinstance(value, str) and "${" in value) and (value is None or conforms(value, spec.hint)):
                    check_value(f"{METHOD_GROUP}.{key}", value, spec)
