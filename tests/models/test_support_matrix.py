"""The support matrix (ftlab.models.support): every architecture family's tiny model x every
built-in method x quantization none|nf4 completes (an nf4 run with 4-bit layers) or is refused in
one line before loading; never a traceback. docs/models.md shows the table the whole matrix gives.

The whole matrix (~1,000 two-step runs in one process, ~10 minutes) is slow; the quick loop runs
LoRA on every family and QLoRA on three."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from ftlab.methods.full import Full
from ftlab.models.families import FAMILIES
from ftlab.models.support import Cell, builtin_methods, markdown_table, run_cell, run_matrix, table_in
from ftlab.testing import registered

DOCS = Path(__file__).parents[2] / "docs" / "models.md"


def _failures(cells: list[Cell]) -> str:
    return "\n\n".join(f"{c.family} {c.method} {c.quantization}: {c.detail}" for c in cells
                       if c.status not in ("completed", "refused"))


def test_every_family_trains_lora_and_qlora_where_it_can(tmp_path: Path, cache_dir: Path) -> None:
    """LoRA on every family; QLoRA on two families whose linear layers have biases (the case that
    used to crash after the base score's eval pass) and on Falcon, which must be refused."""
    cells = run_matrix(FAMILIES, ["lora"], ["none"], tmp_path, cache_dir, progress=False)
    cells += run_matrix(["qwen2", "gpt2", "falcon"], ["qlora"], ["nf4"], tmp_path, cache_dir, progress=False)
    assert not _failures(cells), _failures(cells)
    done = {(c.family, c.method) for c in cells if c.status == "completed"}
    assert done == {(f, "lora") for f in FAMILIES} | {("qwen2", "qlora"), ("gpt2", "qlora")}
    falcon = next(c for c in cells if (c.family, c.method) == ("falcon", "qlora"))
    assert falcon.status == "refused" and "FalconLinear" in falcon.detail  # not silently float
    assert all(c.quantized_layers for c in cells if c.method == "qlora" and c.status == "completed")


class _BrokenOnGpt2(Full):
    """A control: fails inside apply on GPT-2 only (a method that assumes Llama's names)."""

    def apply(self, model: nn.Module) -> nn.Module:
        model.model.layers  # GPT-2 has transformer.h: AttributeError
        return super().apply(model)


def test_a_method_that_breaks_on_a_family_is_reported_as_failed(tmp_path: Path, cache_dir: Path) -> None:
    """The control for the matrix: a broken cell is a failure with its traceback, and the table
    then differs from a clean one."""
    with registered("broken_on_gpt2", _BrokenOnGpt2):
        llama = run_cell("llama", "broken_on_gpt2", "none", tmp_path, cache_dir)
        gpt2 = run_cell("gpt2", "broken_on_gpt2", "none", tmp_path, cache_dir)
    assert llama.status == "completed"
    assert gpt2.status == "failed" and "AttributeError" in gpt2.detail and "Traceback" in gpt2.detail
    clean = markdown_table([llama, Cell("gpt2", "broken_on_gpt2", "none", "completed")])
    assert markdown_table([llama, gpt2]) != clean


@pytest.mark.slow
def test_the_whole_matrix_and_the_documented_table(tmp_path: Path, cache_dir: Path) -> None:
    cells = run_matrix(FAMILIES, builtin_methods(), work=tmp_path, cache_dir=cache_dir, progress=False)
    assert not _failures(cells), _failures(cells)
    assert all(c.quantized_layers for c in cells if c.quantization == "nf4" and c.status == "completed")
    table = markdown_table(cells)
    assert table_in(DOCS) == table, (
        "docs/models.md's support table is not what the matrix gives; regenerate it with "
        "`python -m ftlab.models.support --write docs/models.md`\n" + table)
