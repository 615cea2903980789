"""The command line's overrides: parsed, expanded into the values a sweep will run, and checked.

``check`` is what needs neither the method registry (torch, peft: seconds to import) nor a
composition: each override parses; a group option exists (``model=tinyy``); a key exists in some
option of its group (``trainer.max_stpes``: a key no option of ``trainer`` has); every value
(every value of a sweep) fits the key's spec in ``ftlab.schema``. So most mistakes fail in
about a second. What depends on the composed config (the method's fields, a key only some
options have, combinations of fields) is checked by composing: ``ftlab.config.check_overrides``
composes once per value a sweep runs (``variations``) and validates each.

Keys that only the method node, Hydra or a plugin group knows are left to that later check.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from ftlab.config import CONF_DIR, CONFIG_NAME
from ftlab.errors import ConfigError
from ftlab.schema import check_value, shown, spec_at, unknown_key_message

__all__ = ["Inventory", "check", "inventory", "parse", "sweep_values", "variations"]

SKIPPED = ("hydra", "method")  # keys only Hydra or the method registry can judge


def parse(overrides: Sequence[str]) -> list[Any]:
    """Hydra's ``Override`` of each string; one that does not parse is a one-line ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except HydraException as exc:
            detail = str(exc).strip().splitlines()[0]
            raise ConfigError(f"{text}: cannot parse this override ({detail}; see "
                              "https://hydra.cc/docs/advanced/override_grammar/basic)") from None
    return parsed


def sweep_values(override: Any) -> list[Any]:
    """The values an override sets: one, each value of a choice sweep, the first and last of a
    range, both ends of an interval (Optuna); none for ``glob(...)`` (Hydra expands it)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    if not override.is_sweep_override():
        return [override.value()]
    value = override.value()
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        return values[:1] + values[-1:] if len(values) > 1 else values
    if isinstance(value, ChoiceSweep):
        return list(override.sweep_iterator())
    return []


def sweep_strings(override: Any) -> list[str]:
    """``sweep_values`` as override strings (``key=value``), to compose one value at a time."""
    from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep

    if not override.is_sweep_override():
        return [override.input_line]
    key, value = override.get_key_element(), override.value()
    if isinstance(value, IntervalSweep):
        return [f"{key}={Override._get_value_element_as_str(v)}" for v in (value.start, value.end)]
    if not sweep_values(override):  # glob(...): Hydra expands it against the config repository
        return []
    strings = list(override.sweep_string_iterator())
    if isinstance(value, RangeSweep) and len(strings) > 1:
        strings = [strings[0], strings[-1]]
    return [f"{key}={s}" for s in strings]


def variations(overrides: Sequence[str], extra_sweeps: Sequence[str] = ()) -> list[list[str]]:
    """The override lists to compose so that every value of every sweep is composed once: the
    first value of each sweep, then each other value of one sweep with the first of the others
    (not the cartesian product). ``extra_sweeps``: the sweeps a config file declares
    (``hydra.sweeper.params``), for keys the command line does not sweep."""
    parsed = parse(overrides)
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    parsed += [o for o in parse(extra_sweeps) if o.is_sweep_override() and o.get_key_element() not in swept]
    options = [sweep_strings(o) if o.is_sweep_override() else [o.input_line] for o in parsed]
    options = [opts for opts in options if opts]
    base = [opts[0] for opts in options]
    out = [base]
    for i, opts in enumerate(options):
        for other in opts[1:]:
            out.append([*base[:i], other, *base[i + 1:]])
    return out


# -- what the shipped configs hold --------------------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    """Every key some option of some group of the shipped configs sets, and every group's options."""

    keys: frozenset[str]  # dotted keys and their prefixes, from train.yaml and every group option
    opaque: frozenset[str]  # keys holding a list or an empty mapping: what is under them is not known here
    groups: dict[str, tuple[str, ...]]  # group -> its options

    def children(self, parent: str) -> list[str]:
        depth = parent.count(".") + 1 if parent else 0
        return sorted({k.split(".")[depth] for k in self.keys if (k.startswith(parent + ".") if parent else True)
                       and k.count(".") >= depth})


@functools.lru_cache(maxsize=1)
def inventory() -> Inventory:
    keys: set[str] = set()
    opaque: set[str] = set()
    groups: dict[str, tuple[str, ...]] = {}

    def add(node: Any, prefix: str) -> None:
        """Record ``prefix`` and every key under ``node``."""
        keys.update(".".join(prefix.split(".")[: i + 1]) for i in range(prefix.count(".") + 1))
        if isinstance(node, DictConfig) and len(node):
            add_children(node, prefix)
        elif isinstance(node, (DictConfig, ListConfig)):  # an empty mapping or a list
            opaque.add(prefix)

    def add_children(node: Any, prefix: str) -> None:
        """The keys of a file's root node (an empty file adds none, and hides nothing)."""
        if isinstance(node, DictConfig):
            for key in node.keys():
                if key != "defaults" or prefix:
                    add(node._get_node(key), f"{prefix}.{key}" if prefix else str(key))

    add_children(OmegaConf.load(CONF_DIR / f"{CONFIG_NAME}.yaml"), "")
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        files = sorted(folder.glob("*.yaml"))
        if not files:
            continue
        groups[folder.name] = tuple(f.stem for f in files)
        keys.add(folder.name)
        for file in files:
            text = file.read_text(encoding="utf-8")
            node = OmegaConf.create(text)
            is_global = any(line.strip().replace(" ", "") == "#@package_global_" for line in text.splitlines()[:5])
            if isinstance(node, DictConfig):
                node = OmegaConf.masked_copy(node, [k for k in node.keys() if k != "defaults"])
                add_children(node, "" if is_global else folder.name)
    return Inventory(frozenset(keys), frozenset(opaque), groups)


def _skipped(key: str) -> bool:
    return key.split(".")[0].split("/")[0] in SKIPPED or "/" in key


def _check_key(key: str, inv: Inventory) -> None:
    """A key no option of its group sets (nor train.yaml, nor a preset) is a typo."""
    if key in inv.keys:
        return
    parts = key.split(".")
    parent = ""
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in inv.keys:
            parent = prefix
            break
    if parent in inv.opaque or (parent and not inv.children(parent)):
        return  # under a list, an empty mapping or a value: not this check's to judge
    unknown = ".".join(parts[: parent.count(".") + 2 if parent else 1])  # the first segment no option has
    raise ConfigError(unknown_key_message(unknown, inv.children(parent)))


def check(overrides: Sequence[str]) -> list[Any]:
    """The checks that need no composition and no method registry (see the module's doc);
    returns the parsed overrides."""
    parsed = parse(overrides)
    inv = inventory()
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or o.package or _skipped(key):
            continue
        values = sweep_values(o)
        if key in inv.groups:
            for value in values:
                if value is not None and str(value) not in inv.groups[key]:
                    raise ConfigError(f"{key}={shown(value)}: no such option of the {key} group; "
                                      f"options: {', '.join(inv.groups[key])}")
            continue
        if not (o.is_add() or o.is_force_add()):
            _check_key(key, inv)
        spec = spec_at(key)
        if spec is None:
            continue
        for value in values:
            if not _interpolation(value):
                check_value(key, value, spec)
    return parsed


def _interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value

