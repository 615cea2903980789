"""The support matrix: every architecture family x every built-in method x quantization none|nf4.

Each cell is a real run (``ftlab.train.train``, two optimizer steps, validation and a two-prompt
generation score) on that family's tiny random-init model (``model=tiny model.family=...``), or
the refusal ``ftlab.config.validate`` gives before anything loads. A cell ends ``completed`` (an
nf4 one with bitsandbytes layers in its blocks) or ``refused`` with its one-line reason; anything
else is a failure, reported with its error. docs/models.md holds the table this writes::

    python -m ftlab.models.support --write docs/models.md     # the whole matrix, ~10 minutes
    python -m ftlab.models.support --families gpt2 qwen2 --methods lora oft

tests/models/test_support_matrix.py runs the same cells and requires docs/models.md to match.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["Cell", "QUANTIZATIONS", "builtin_methods", "cell_overrides", "markdown_table", "run_cell", "run_matrix",
           "write_table"]

QUANTIZATIONS = ("none", "nf4")
TABLE_START = "<!-- support-table:start -->"
TABLE_END = "<!-- support-table:end -->"

# two optimizer steps with a validation pass and a short generation score: every path a run takes
RUN_SETTINGS = (
    "logger=none", "callbacks=none", "trainer.precision=32-true", "trainer.max_steps=2", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "data.num_train=16", "data.num_val=8",
    "data.batch_size=4", "eval.num_prompts=2", "eval.num_samples=0", "eval.max_new_tokens=8",
    "checkpoint.every_n_steps=100",
)


@dataclass
class Cell:
    """One family x method x quantization: ``completed``, ``refused`` (with the reason) or
    ``failed`` (with the error and its traceback)."""

    family: str
    method: str
    quantization: str
    status: str
    detail: str = ""
    quantized_layers: int | None = None


def builtin_methods() -> list[str]:
    """The methods ftlab itself ships (its entry points), in name order."""
    from ftlab.registry import get_registry

    return sorted(name for name, info in get_registry().methods.items() if info.package.split(" ")[0] == "ftlab")


def cell_overrides(family: str, method: str, quantization: str, output_dir: Path, cache_dir: Path) -> list[str]:
    from ftlab.registry import get_registry

    data = {"preference": ["data=preference"]}.get(get_registry().get(method).cls.batch_kind, [])
    return ["model=tiny", f"model.family={family}", f"method={method}", f"quantization={quantization}",
            *data, *RUN_SETTINGS, f"paths.output_dir={output_dir}", f"paths.cache_dir={cache_dir}"]


def run_cell(family: str, method: str, quantization: str, work: Path, cache_dir: Path) -> Cell:
    """Compose, validate and train one cell; a ConfigError from composing is its refusal."""
    from ftlab.config import compose
    from ftlab.errors import ConfigError
    from ftlab.results import read_metrics
    from ftlab.train import train

    out = work / f"{family}-{method}-{quantization}"
    try:
        cfg = compose(cell_overrides(family, method, quantization, out, cache_dir))
    except ConfigError as err:
        return Cell(family, method, quantization, "refused", str(err))
    try:
        train(cfg)
    except Exception as err:  # the matrix reports every failure; it must not stop at the first
        return Cell(family, method, quantization, "failed", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    record = read_metrics(out) or {}
    layers = (record.get("quantized_linear") or {})
    count = int(layers.get("linear4bit", 0)) + int(layers.get("linear8bit", 0))
    status = str(record.get("status"))
    if status == "completed" and quantization != "none" and count == 0:
        return Cell(family, method, quantization, "failed", "completed with no quantized layer", count)
    return Cell(family, method, quantization, status, "" if status == "completed" else str(record.get("error")), count)


def run_matrix(families: Iterable[str], methods: Iterable[str], quantizations: Iterable[str] = QUANTIZATIONS,
               work: Path | None = None, cache_dir: Path | None = None, progress: bool = True) -> list[Cell]:
    """Every cell, on one torch thread (tiny models run fastest so), sharing one model cache."""
    from ftlab.testing import one_thread

    work = Path(work or tempfile.mkdtemp(prefix="ftlab-support-"))
    cache_dir = Path(cache_dir or work / "cache")
    cells = [(f, m, q) for f in families for m in methods for q in quantizations]
    quiet = [logging.getLogger(n) for n in ("ftlab", "pytorch_lightning", "lightning", "transformers")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    results: list[Cell] = []
    try:
        with one_thread():
            for i, (f, m, q) in enumerate(cells, 1):
                cell = run_cell(f, m, q, work, cache_dir)
                results.append(cell)
                if progress:
                    print(f"[{i}/{len(cells)}] {f} {m} {q}: {cell.status}", flush=True)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return results


def _short(reason: str) -> str:
    """A refusal's reason without the ``method 'x' cannot train tiny-y (...)`` prefix the table's
    row and column already say."""
    return re.sub(r"^(method '[^']+' cannot train|quantization=\w+ cannot quantize) [^:]*: ", "", reason)


def markdown_table(cells: Sequence[Cell]) -> str:
    """Families as rows, methods as columns; a cell says ``yes`` (both quantizations completed),
    ``none`` (only unquantized: nf4 refused), ``nf4`` (only quantized), or a note number whose
    reason is listed under the table."""
    families = list(dict.fromkeys(c.family for c in cells))
    methods = list(dict.fromkeys(c.method for c in cells))
    by = {(c.family, c.method, c.quantization): c for c in cells}
    notes: dict[str, int] = {}

    def mark(family: str, method: str) -> str:
        got = {q: by.get((family, method, q)) for q in QUANTIZATIONS}
        done = [q for q, c in got.items() if c is not None and c.status == "completed"]
        if len(done) == len(QUANTIZATIONS):
            return "yes"
        others = [c for q, c in got.items() if c is not None and c.status != "completed"]
        # a quantization the method never takes (full on nf4, qlora on none) is the method's, not the model's
        own = [c for c in others if "cannot train on a quantization=" not in c.detail]
        label = "+".join(done) if done else "-"
        for c in own:
            reason = f"{c.status}: {_short(c.detail.splitlines()[0] if c.detail else '')}"
            number = notes.setdefault(reason, len(notes) + 1)
            label += f" [{number}]" if c.quantization == "none" or len(own) == 1 else f" [{number}]({c.quantization})"
        return label

    header = "| family | " + " | ".join(methods) + " |"
    rule = "|---|" + "---|" * len(methods)
    rows = [f"| {f} | " + " | ".join(mark(f, m) for m in methods) + " |" for f in families]
    listed = [f"{n}. {reason}" for reason, n in notes.items()]
    return "\n".join([header, rule, *rows, "", *listed]) + "\n"


def write_table(path: Path, table: str) -> None:
    """Replace the table between the markers in ``path`` (docs/models.md)."""
    text = path.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    path.write_text(text[:start] + "\n" + table + text[end:])


def table_in(path: Path) -> str:
    """The table now between the markers of ``path``."""
    text = path.read_text()
    return text[text.index(TABLE_START) + len(TABLE_START):text.index(TABLE_END)].strip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from ftlab.models.families import FAMILIES

    parser = argparse.ArgumentParser(prog="python -m ftlab.models.support", description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--quantizations", nargs="*", default=list(QUANTIZATIONS))
    parser.add_argument("--write", type=Path, help="replace the support table in this file (docs/models.md)")
    parser.add_argument("--json", type=Path, help="also write every cell, with failures' tracebacks, here")
    args = parser.parse_args(argv)
    cells = run_matrix(args.families, args.methods or builtin_methods(), args.quantizations)
    table = markdown_table(cells)
    print(table)
    if args.json:
        args.json.write_text(json.dumps([c.__dict__ for c in cells], indent=1))
    if args.write:
        write_table(args.write, table)
    failed = [c for c in cells if c.status not in ("completed", "refused")]
    for c in failed:
        print(f"FAILED {c.family} {c.method} {c.quantization}: {c.detail.splitlines()[0] if c.detail else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
