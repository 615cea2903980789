"""``ftlab methods``: every installed method and preset, where it came from, and its fields."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ftlab.methods.base import config_fields, field_default, field_help
from ftlab.registry import Registry, get_registry


def methods_table(registry: Registry) -> Table:
    table = Table(title="ftlab methods", show_lines=True)
    table.add_column("method", style="bold cyan", max_width=32)
    table.add_column("package", no_wrap=True)
    table.add_column("quantized bases")
    table.add_column("fields (default): help", ratio=2)
    for name, info in sorted(registry.methods.items()):
        fields = escape("\n".join(
            f"{f.name} ({field_default(f)!r}{_declared(info.cls.Config, f.name)})"
            + (f": {field_help(f)}" if field_help(f) else "")
            for f in config_fields(info.cls.Config)
        ))
        package = f"{info.package} {info.version}".strip()
        summary = (info.cls.__doc__ or "").strip().splitlines()[:1]
        table.add_row(name + ("\n[dim]" + escape(summary[0]) + "[/dim]" if summary else ""), package, ", ".join(q for q in info.cls.quantizations if q != "none") or "-", fields)
    return table


def _declared(config: type, name: str) -> str:
    """``; an integer >= 1`` for a field that declares a range or choices (ftlab.schema), else ''."""
    from ftlab.schema import spec_of

    spec = spec_of(config, name)
    return f"; {spec.expected()}" if spec.ranged or spec.choices is not None or spec.also else ""


def presets_table(registry: Registry) -> Table:
    table = Table(title="ftlab method presets (method=NAME starts from a method's node)", show_lines=True)
    table.add_column("preset", style="bold cyan", max_width=32)
    table.add_column("package", no_wrap=True)
    table.add_column("starts from")
    table.add_column("sets", ratio=2)
    for name, preset in sorted(registry.presets.items()):
        label = name + ("\n[dim]" + escape(preset.summary) + "[/dim]" if preset.summary else "")
        sets = escape(", ".join(f"{k}={v!r}" for k, v in preset.values.items()))
        table.add_row(label, f"{preset.package} {preset.version}".strip(), preset.base, sets)
    return table


def print_methods(registry: Registry | None = None, console: Console | None = None) -> None:
    registry = registry or get_registry()
    console = console or Console()
    console.print(methods_table(registry))
    if registry.presets:
        console.print(presets_table(registry))
    for name, reason in sorted(registry.broken.items()):
        console.print(f"[red]broken plugin[/red] {name}: {reason}")
    console.print("Use one with: python -m ftlab method=NAME method.FIELD=VALUE")
