"""``ftlab methods --sizes``: trainable parameters and saved size of every method on one model.

Each method is applied to the base model named by the overrides (``model=llama`` by default)
and saved exactly as a run saves it, so the table shows what a user's run folder will hold.
No training happens: the numbers depend only on the architecture and the method's settings.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ftlab.config import compose
from ftlab.registry import Registry, get_registry
from ftlab.results import folder_mb

log = logging.getLogger("ftlab")


def measure(method: str, overrides: Sequence[str], workdir: Path) -> dict[str, Any]:
    """Apply ``method`` to the configured base, save its artifact, and measure both."""
    from ftlab.build import build_model
    from ftlab.models.loading import count_parameters

    cfg = compose([f"method={method}", *overrides])
    applied, model, _ = build_model(cfg)
    trainable, total = count_parameters(model)
    saved = applied.save(model, workdir / method)
    return {
        "method": method,
        "quantization": cfg.quantization.name,
        "trainable": trainable,
        "total": total,
        "saved_mb": folder_mb(saved, "*.safetensors"),
        "artifact": applied.artifact,
    }


def sizes_table(overrides: Sequence[str] = ("model=llama",), registry: Registry | None = None) -> str:
    """A markdown table, one row per registered method (presets left out: they only change fields)."""
    registry = registry or get_registry()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftlab-sizes-") as tmp:
        for name in sorted(registry.methods):
            log.info("measuring %s", name)
            rows.append(measure(name, overrides, Path(tmp)))
    lines = [
        "| method | base | trainable params | % of all | saved | saved MB |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['quantization']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f} "
            f"| {r['artifact']} | {r['saved_mb']:.2f} |"
        )
    return "\n".join(lines) + "\n"
