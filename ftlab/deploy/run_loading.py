"""Open a finished run folder again: its config, its data and its trained model.

A run folder records the overrides it was started with (``.hydra/overrides.yaml``), so
composing them again gives exactly the base model, quantization, method and data it trained
with; the trained artifact (``adapter/`` or ``model/``) is then loaded onto a fresh base
through the method's own ``load``. ``ftlab eval``, ``ftlab export``, ``ftlab generate`` and
``ftlab chat`` all start here, so they agree on what "the run's model" is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from omegaconf import DictConfig, OmegaConf

from ftlab.config import task_of
from ftlab.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from ftlab.data.datamodule import FineTuneDataModule
    from ftlab.methods.base import BaseMethod

__all__ = ["FinishedRun", "LoadedRun", "is_run_folder", "open_run", "recorded_overrides"]

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / OVERRIDES_FILE).is_file()


def recorded_overrides(run_dir: str | Path) -> list[str]:
    """The command-line overrides the run was started with."""
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder of ftlab (no .hydra/overrides.yaml); give the folder a run wrote")
    return [str(o) for o in OmegaConf.load(path)]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class LoadedRun:
    """A finished run's trained model, ready to use."""

    run: "FinishedRun"
    method: "BaseMethod"
    model: "nn.Module"
    tokenizer: "PreTrainedTokenizerBase"


@dataclass
class FinishedRun:
    """A run folder with its config composed again; models load on demand (they are the slow part)."""

    run_dir: Path
    cfg: DictConfig
    datamodule: "FineTuneDataModule"

    @property
    def task(self) -> str:
        return task_of(self.cfg)

    @property
    def labels(self) -> list[str] | None:
        """The class names a classification run's head was built for (None for causal LM)."""
        return self.datamodule.labels if self.task == "classification" else None

    def artifact_dir(self, name: str) -> Path:
        folder = self.run_dir / name
        if not folder.is_dir():
            raise ConfigError(f"{self.run_dir}: no saved '{name}' folder (was the run saved? save_model=false skips it)")
        return folder

    def load_base(self) -> tuple["BaseMethod", "nn.Module", "PreTrainedTokenizerBase"]:
        """The method (not applied) and the base model the run started from."""
        from ftlab.build import load_base

        return load_base(self.cfg, self.labels)

    def load_trained(self, method: "BaseMethod", base: "nn.Module") -> "nn.Module":
        """The trained model: the run's artifact put onto ``base`` (a fresh one) by the method."""
        return method.load(base, self.artifact_dir(method.artifact))

    def load(self) -> LoadedRun:
        method, base, tokenizer = self.load_base()
        return LoadedRun(self, method, self.load_trained(method, base), tokenizer)


def open_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> FinishedRun:
    """Compose the run's config again; ``overrides`` replace recorded settings of the same key."""
    from ftlab.config import compose
    from ftlab.data.datamodule import FineTuneDataModule

    run_dir = Path(run_dir)
    recorded = recorded_overrides(run_dir)
    changed = {_key(o) for o in overrides}
    kept = [o for o in recorded if _key(o) not in changed]
    cfg = compose([*kept, *overrides, f"paths.output_dir={run_dir}", "logger=none", "callbacks=none"])
    return FinishedRun(run_dir, cfg, FineTuneDataModule(cfg.data))
