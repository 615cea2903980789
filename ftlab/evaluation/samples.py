"""Sample generations at every validation: read what the model answers as it trains.

Why: a falling loss can hide a model that never stops talking or answers in the wrong format;
a handful of prompt/reference/prediction rows per validation shows it at a glance, in
TensorBoard or W&B, and in ``samples.jsonl`` for any logger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from ftlab.evaluation.checkers import get_checker
from ftlab.errors import ConfigError
from ftlab.evaluation.generation import reference_answer, score_generations

COLUMNS = ("step", "prompt", "reference", "prediction", "correct")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """Rows as a Markdown table (TensorBoard renders text summaries as Markdown)."""

    def cell(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_samples(trainer: pl.Trainer, rows: Sequence[dict[str, Any]], out_file: Path | None, key: str,
                  columns: Sequence[str]) -> None:
    """Append ``rows`` to ``out_file`` (JSON lines, when given) and show them in the run's
    TensorBoard (a markdown table) and wandb (a table) loggers under ``key``."""
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with out_file.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(rows, columns), trainer.global_step)
        elif isinstance(logger, WandbLogger):
            data = [[row[c] for c in columns] for row in rows]
            logger.log_text(key=key, columns=list(columns), data=data, step=trainer.global_step)


class GenerationSamples(pl.Callback):
    """Generates answers for the first ``num_samples`` records (with a reference) after every
    validation and logs them with the checker's verdict."""

    def __init__(
        self,
        records: Sequence[dict],
        tokenizer: Any,
        num_samples: int = 4,
        max_new_tokens: int | None = None,
        out_file: Path | None = None,
        checker: str = "exact",
    ) -> None:
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        get_checker(checker)  # a misspelt checker fails before training, not at the first validation
        self.records = [r for r in records if reference_answer(r) is not None][:num_samples]
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.out_file = Path(out_file) if out_file is not None else None
        self.checker = checker

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.records:
            return
        write_samples(trainer, self.sample(pl_module, trainer.global_step), self.out_file, "samples", COLUMNS)

    def sample(self, pl_module: pl.LightningModule, step: int) -> list[dict[str, Any]]:
        """One row per sample record; training's RNG streams and train mode are left as found."""
        device = pl_module.device
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        method = getattr(pl_module, "method", None)
        with torch.random.fork_rng(devices=devices):
            score = score_generations(
                pl_module.model,
                self.tokenizer,
                self.records,
                checker=self.checker,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.num_samples,
                num_samples=self.num_samples,
                model_inputs=getattr(method, "model_inputs", None),
            )
        return [{"step": step, **sample} for sample in score.samples]
