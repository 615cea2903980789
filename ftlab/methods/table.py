"""``ftlab methods``: every installed method and preset, where it came from, and its fields."""

from __future__ import annotations

from rich.console import Console

from ftlab.methods.base import config_fields, field_default, field_help
from ftlab.registry import Registry, get_registry
from ftlab.tables import pipe_table, print_markdown


def methods_table(registry: Registry) -> str:
    """One row per method: its name and summary, package, quantized bases, and one line per field."""
    rows = []
    for name, info in sorted(registry.methods.items()):
        fields = "\n".join(
            f"{f.name} ({field_default(f)!r}{_declared(info.cls.Config, f.name)})"
            + (f": {field_help(f)}" if field_help(f) else "")
            for f in config_fields(info.cls.Config)
        )
        summary = (info.cls.__doc__ or "").strip().splitlines()[:1]
        rows.append([name + ("\n" + summary[0] if summary else ""), f"{info.package} {info.version}".strip(),
                     ", ".join(q for q in info.cls.quantizations if q != "none") or "-", fields])
    return "## ftlab methods\n\n" + pipe_table(["method", "package", "quantized bases", "fields (default): help"], rows)


def _declared(config: type, name: str) -> str:
    """``; an integer >= 1`` for a field that declares a range or choices (ftlab.schema), else ''."""
    from ftlab.schema import spec_of

    spec = spec_of(config, name)
    return f"; {spec.expected()}" if spec.ranged or spec.choices is not None or spec.also else ""


def presets_table(registry: Registry) -> str:
    rows = [[name + ("\n" + preset.summary if preset.summary else ""), f"{preset.package} {preset.version}".strip(),
             preset.base, ", ".join(f"{k}={v!r}" for k, v in preset.values.items())]
            for name, preset in sorted(registry.presets.items())]
    return ("## ftlab method presets (method=NAME starts from a method's node)\n\n"
            + pipe_table(["preset", "package", "starts from", "sets"], rows))


def methods_text(registry: Registry) -> str:
    """What ``ftlab methods`` prints, as markdown."""
    parts = [methods_table(registry)]
    if registry.presets:
        parts.append(presets_table(registry))
    parts += [f"broken plugin {name}: {reason}\n" for name, reason in sorted(registry.broken.items())]
    parts.append("Use one with: python -m ftlab method=NAME method.FIELD=VALUE\n")
    return "\n".join(parts)


def print_methods(registry: Registry | None = None, console: Console | None = None) -> None:
    """Print ``methods_text`` (``ftlab.tables.print_markdown``: rich tables on a terminal they fit,
    else the markdown; nothing is cut)."""
    print_markdown(methods_text(registry or get_registry()), console)
