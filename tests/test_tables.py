"""Printed tables cut nothing: a redirected or too-narrow output is the markdown itself, a terminal
gets a rich table whose cells wrap (ftlab.tables)."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.markdown import Markdown

from ftlab.results import write_metrics
from ftlab.tables import parse_blocks, pipe_table, print_markdown

LONG = "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def _sweep(root: Path) -> Path:
    """Jobs with long labels (two swept overrides each) and numbers that need every digit."""
    jobs = [("lora", 0, 6.912345), ("lora", 1, 6.9187), ("adalora", 0, 7.0412), ("full", 0, 5.123456)]
    for num, (method, seed, val) in enumerate(jobs):
        write_metrics(root / f"{num}_{method}", {
            "method": method, "seed": seed, "status": "completed", "job_num": num, "max_steps": 5,
            "overrides": [f"method={method}", f"seed={seed}", f"{LONG if method != 'full' else 'method.lr=0.00012345'}"],
            "val_loss": val, "trainable_params": 1_234_567 * (num + 1), "total_params": 98_765_432,
            "peak_rss_mb": 12_345.6 + num, "tokens_per_s": 1234.5, "wall_s": 987.6, "train_tokens": 20_000})
    return root


def _table_cells(markdown: str) -> list[str]:
    """Every cell of every pipe table in ``markdown``, headers included."""
    return [c for block in parse_blocks(markdown) if isinstance(block, list) for row in block for c in row]


def _shows_in_full(printed: str, markdown: str) -> bool:
    """Every cell of the markdown's tables is in ``printed`` whole, and no "…"."""
    return "…" not in printed and all(cell in printed for cell in _table_cells(markdown))


@pytest.mark.slow  # a subprocess (imports, the plot): ~5 s on a busy 2-core machine; the test below runs in-process
def test_compare_redirected_at_80_columns_prints_every_label_and_number(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path / "sweep")
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("FORCE_COLOR", None), env.pop("TTY_COMPATIBLE", None)
    out = subprocess.run([sys.executable, "-m", "ftlab", "compare", str(sweep)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    markdown = (sweep / "comparison.md").read_text()
    assert out.stdout == markdown  # not a terminal: the markdown itself, to paste or grep
    labels = [f"method={m} {LONG}" for m in ("lora", "adalora")] + ["method=full method.lr=0.00012345"]
    for label in labels:
        assert f"| {label} |" in out.stdout
    for cell in ("6.9155 ± 0.0045", "1,851,850 ± 872,971", "12,346 ± 1", "1,234 ± 0", "987.6 ± 0.0", "5.1235"):
        assert cell in out.stdout
    assert _shows_in_full(out.stdout, markdown)
    with (sweep / "results.csv").open() as f:  # the files keep every digit
        assert {r["val_loss"] for r in csv.DictReader(f)} == {"6.912345", "6.9187", "7.0412", "5.123456"}
    # control: what `ftlab compare` printed before, rich's Markdown at 80 columns, cuts the cells
    old = io.StringIO()
    Console(file=old, width=80).print(Markdown(markdown))
    assert "…" in old.getvalue() and not _shows_in_full(old.getvalue(), markdown)
    assert not any(label in old.getvalue() for label in labels)


def test_end_of_sweep_and_compare_tables_redirected_at_80_columns(tmp_path: Path, monkeypatch, capsys) -> None:
    from omegaconf import OmegaConf

    from ftlab.cli import main
    from ftlab.sweeps.callback import CompareSweep

    sweep = _sweep(tmp_path)
    monkeypatch.setattr("ftlab.sweeps.compare.plot", lambda rows, path: None)  # the png is not what is tested
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    CompareSweep().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    printed = capsys.readouterr().out
    markdown = (sweep / "comparison.md").read_text()
    assert printed == markdown and _shows_in_full(printed, markdown)
    assert f"| method=adalora {LONG} | 1 | 0 | 7.0412 |" in printed
    main(["compare", str(sweep), "--out", str(tmp_path / "again")])  # `ftlab compare` in this process
    assert capsys.readouterr().out == markdown


def _column(printed: str, index: int) -> str:
    """The text of one column of a rich table, its wrapped pieces joined by spaces."""
    pieces = [line.split("│")[index + 1].strip() for line in printed.splitlines() if line.startswith("│")]
    return " ".join(p for p in pieces if p)


def test_terminal_gets_a_table_whose_cells_wrap_and_keep_every_character() -> None:
    rows = [[f"method=lora method.r={r} method.alpha={2 * r} method.target_modules=all-linear", "1", "0",
             f"{6.9 + r / 1000:.4f} ± 0.0123", f"{r * 12_345:,}"] for r in (8, 16, 64)]
    markdown = "# Comparison of 3 runs\n\n" + pipe_table(["run", "completed", "failed", "val loss", "trainable params"], rows)
    out = io.StringIO()
    print_markdown(markdown, Console(file=out, force_terminal=True, width=80, color_system=None))
    printed = out.getvalue()
    assert "┃ run" in printed and "…" not in printed  # a rich table, nothing cut
    assert max(len(line) for line in printed.splitlines()) <= 80
    assert printed.startswith("# Comparison of 3 runs\n")
    for index in range(5):
        column = _column(printed, index)
        for row in rows:
            assert row[index] in column  # wrapped between words, every character kept
    first_row = next(line for line in printed.splitlines() if line.startswith("│"))
    assert first_row.startswith("│ method=lora method.r=8 ")  # no word broken across lines
    # control: rich's Markdown at the same width cuts these labels
    old = io.StringIO()
    Console(file=old, force_terminal=True, width=80, color_system=None).print(Markdown(markdown))
    assert "…" in old.getvalue() and not all(row[0] in _column(old.getvalue(), 0) for row in rows)


def test_a_table_wider_than_the_terminal_or_redirected_is_the_markdown_unchanged() -> None:
    wide = pipe_table([f"column {i}" for i in range(12)], [[f"{i * 1.2345:.4f} ± 0.0001" for i in range(12)]])
    text = "# Heading\n\n" + wide + "\nprose after\n"
    for console in (Console(force_terminal=True, width=80), Console(force_terminal=False, width=300)):
        out = io.StringIO()
        console.file = out
        print_markdown(text, console)
        assert out.getvalue() == text


def test_pipe_table_escapes_bars_and_line_breaks() -> None:
    text = pipe_table(["a", "b"], [["x | y", "one\ntwo"]])
    assert text == "| a | b |\n|---|---|\n| x \\| y | one<br>two |\n"
    assert parse_blocks(text) == [[["a", "b"], ["x | y", "one\ntwo"]]]


def _registry():
    from omegaconf import OmegaConf

    from ftlab.methods.base import BaseMethod, MethodConfig
    from ftlab.registry import MethodInfo, PresetInfo, Registry

    @dataclasses.dataclass
    class Config(MethodConfig):
        long_field_name_here: str = dataclasses.field(
            default="all-linear", metadata={"help": "which modules get the adapter: 'all-linear' or a list"})

    class Extraordinarily(BaseMethod):
        """A method with a long name | and a bar in its summary."""

    Extraordinarily.Config = Config
    name = "long_method_name"
    info = MethodInfo(name, Extraordinarily, "ftlab-long-plugin", "10.20.30", Config)
    preset = PresetInfo("a_preset_with_a_long_name", name, "ftlab", "0.1.0", "the preset's summary line",
                        OmegaConf.create({"defaults": [name], "lr": 0.00012345}))
    return Registry(found={name: info}, broken={"gone": "No module named 'not_installed'"}, presets={preset.name: preset})


@pytest.mark.parametrize("terminal", [True, False])
def test_ftlab_methods_cuts_nothing_at_80_columns(terminal: bool) -> None:
    from ftlab.methods.table import methods_text, print_methods

    registry = _registry()
    out = io.StringIO()
    print_methods(registry, Console(file=out, force_terminal=terminal, width=80, color_system=None))
    printed = out.getvalue()
    assert "…" not in printed and "broken plugin gone: No module named 'not_installed'" in printed
    if not terminal:
        assert printed == methods_text(registry)
        assert "| long_method_name<br>A method with a long name \\| and a bar" in printed
        return
    assert "┃ method" in printed and max(len(line) for line in printed.splitlines()) <= 80
    for text in ("long_method_name A method with a long name | and a bar in its summary.",
                 "a_preset_with_a_long_name the preset's summary line"):
        assert text in _column(printed, 0)
    assert "ftlab-long-plugin 10.20.30" in _column(printed, 1)
    assert ("long_field_name_here ('all-linear'): which modules get the adapter: 'all-linear' or "
            "a list") in _column(printed, 3)
    assert "lr=0.00012345" in _column(printed, 3)


@pytest.mark.parametrize("terminal", [True, False])
def test_ftlab_eval_prints_its_per_class_table_in_full(terminal: bool) -> None:
    from ftlab.evaluation.evaluate import summary_lines

    labels = ["science, technology and the long tail of everything else", "sports"]
    result = {"run_dir": "/runs/classification", "method": "linear_probe", "val_loss": 0.082123, "accuracy": 0.97,
              "precision": 0.9712, "recall": 0.969, "f1": 0.9701,
              "classification": {"per_class": {label: {"precision": 0.9, "recall": 1.0, "f1": 0.947, "support": 12}
                                               for label in labels}}}
    text = "\n".join(summary_lines(result)) + "\n"
    out = io.StringIO()
    print_markdown(text, Console(file=out, force_terminal=terminal, width=80, color_system=None))
    printed = out.getvalue()
    assert "accuracy 0.9700, macro precision 0.9712, recall 0.9690, F1 0.9701" in printed and "…" not in printed
    assert "written to /runs/classification/eval.json" in printed
    if not terminal:
        assert printed == text and f"| {labels[0]} | 0.900 | 1.000 | 0.947 | 12 |" in printed
        return
    assert "┃ class" in printed and all(label in _column(printed, 0) for label in labels)
