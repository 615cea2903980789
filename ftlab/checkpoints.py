"""Resumable training state: checkpoints every N steps and on SIGINT/SIGTERM, found again on resume.

A checkpoint is Lightning's own (``Trainer.save_checkpoint``: optimizer, scheduler, loop
progress, callback states) with three changes that make it worth resuming from:

* it holds only the weights being trained (``requires_grad`` or in an optimizer group), not the
  frozen base, which ``ftlab`` rebuilds from the model config: a LoRA checkpoint of SmolLM2 is a
  few MB, not 540 MB;
* ``ResumeState`` adds what Lightning leaves out: the global RNG states (dropout masks), the data
  position (the shuffling generator's state at the start of the epoch and how many batches of it
  were trained on) and the training losses so far, so a resumed run takes the same batches with
  the same dropout as an uninterrupted one;
* ``AtomicCheckpointIO`` writes each file to a temporary name and renames it, then writes its
  sha256 in a ``.sha256`` file beside it (written last), so ``newest_checkpoint`` can skip a
  damaged file and fall back to the previous one with a warning.

``StepCheckpoints`` is Lightning's ``ModelCheckpoint`` keeping the newest ``checkpoint.keep``
files by step, saving on an exception only for a signal (Lightning stops at a batch boundary, so
the state is consistent; a crash mid-step is not).
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ftlab.cache import atomic_write, atomic_write_json, file_sha256
from ftlab.errors import ConfigError

__all__ = ["CHECKPOINT_DIR", "AtomicCheckpointIO", "ResumeState", "StepCheckpoints", "checkpoint_callbacks",
           "newest_checkpoint", "resolve_ckpt_path", "verify_checkpoint"]

log = logging.getLogger("ftlab")
CHECKPOINT_DIR = "checkpoints"  # in the run folder
SUFFIX = ".ckpt"
HASH_SUFFIX = ".sha256"  # beside each checkpoint: {"sha256": ..., "size": ...}, written after it
_STEP = re.compile(r"step-(\d+)\.ckpt$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through ``ftlab.cache.atomic_write`` (temporary file, fsync, rename); then the hash file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        Path(str(path) + HASH_SUFFIX).unlink(missing_ok=True)  # the old hash no longer describes the file
        atomic_write(path, lambda f: torch.save(checkpoint, f))
        atomic_write_json(Path(str(path) + HASH_SUFFIX), {"sha256": file_sha256(path), "size": path.stat().st_size})

    def remove_checkpoint(self, path: Any) -> None:
        Path(path).unlink(missing_ok=True)
        Path(str(path) + HASH_SUFFIX).unlink(missing_ok=True)


def verify_checkpoint(path: Path) -> Optional[str]:
    """What is wrong with the checkpoint file ``path`` (None when its size and hash match)."""
    record = Path(str(path) + HASH_SUFFIX)
    try:
        expected = json.loads(record.read_text())
        size, digest = int(expected["size"]), str(expected["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {record.name} (the write did not finish)"
    actual = path.stat().st_size
    if actual != size:
        return f"{actual} bytes where {size} were written (truncated or overwritten)"
    if file_sha256(path) != digest:
        return "its content does not match the sha256 written with it (damaged)"
    return None


def _step_of(path: Path) -> int:
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else -1


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint of ``run_dir`` whose size and hash match; a damaged newer one is
    named in a warning and skipped (the previous one is used)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    candidates = sorted(folder.glob(f"step-*{SUFFIX}"), key=_step_of, reverse=True) if folder.is_dir() else []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged: %s; falling back to an older one", path, problem)
    return None


def resolve_ckpt_path(value: Any, run_dir: Path, resume: bool) -> Optional[Path]:
    """The checkpoint to continue from: ``ckpt_path`` (a file, or a run folder's newest valid
    checkpoint) when given, else with ``resume=true`` this run folder's newest valid one."""
    if value not in (None, ""):
        path = Path(str(value)).expanduser()
        if path.is_dir():
            found = newest_checkpoint(path)
            if found is None:
                raise ConfigError(f"ckpt_path={value}: no valid checkpoint in {path / CHECKPOINT_DIR}")
            return found
        if not path.is_file():
            raise ConfigError(f"ckpt_path={value}: no such file or run folder")
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ConfigError(f"ckpt_path={value}: {problem}")
        return path
    if resume:
        found = newest_checkpoint(run_dir)
        if found is None:
            log.info("resume: no checkpoint in %s, training from the start", Path(run_dir) / CHECKPOINT_DIR)
        return found
    return None


def _rng_states() -> dict[str, Any]:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trained_names(module: pl.LightningModule) -> set[str]:
    """The state-dict names of the parameters being trained: ``requires_grad`` ones, and any in an
    optimizer group (a method may unfreeze those later)."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    if module._trainer is not None and module.trainer.optimizers:
        grouped = {id(p) for opt in module.trainer.optimizers for g in opt.param_groups for p in g["params"]}
        names |= {name for name, p in module.named_parameters() if id(p) in grouped}
    return names


class ResumeState(pl.Callback):
    """The part of a run's state Lightning's checkpoint lacks (RNG, data position, losses), and
    the checkpoint's weights cut to those being trained and checked on load."""

    def __init__(self) -> None:
        self.datamodule: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.datamodule = trainer.datamodule
        pl_module.strict_loading = False  # the frozen base is not in the checkpoint; on_load_checkpoint checks the rest

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        keep = trained_names(pl_module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["ftlab_trained"] = sorted(keep)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        expected = trained_names(pl_module)
        saved = set(checkpoint.get("ftlab_trained", checkpoint["state_dict"]))
        if saved != expected:
            missing, extra = sorted(expected - saved), sorted(saved - expected)
            raise ConfigError(
                "the checkpoint was written by a different model or method: "
                f"{len(missing)} trained tensor(s) missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        loader = trainer.train_dataloader if trainer is not None else None
        loader = getattr(loader, "flattened", [loader])[0] if loader is not None else None
        return {
            "rng": _rng_states(),
            "data": {
                "generator": getattr(loader, "epoch_start_state", None),
                "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer else 0,
            },
            "train_losses": list(getattr(trainer.lightning_module, "train_losses", [])) if trainer else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_states(state["rng"])
        data = state.get("data") or {}
        if self.datamodule is not None and hasattr(self.datamodule, "resume_at"):
            self.datamodule.resume_at(data.get("generator"), int(data.get("batches") or 0))
        self._losses = list(state.get("train_losses") or [])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        losses = getattr(self, "_losses", None)
        if losses is not None and hasattr(pl_module, "train_losses"):
            pl_module.train_losses[:0] = losses  # the record covers the whole run, not only the resumed part
            self._losses = None


class StepCheckpoints(ModelCheckpoint):
    """Every ``every_n_steps`` optimizer steps, the newest ``keep`` kept; on SIGINT/SIGTERM too."""

    def __init__(self, run_dir: Path, every_n_steps: Optional[int], keep: int) -> None:
        super().__init__(dirpath=Path(run_dir) / CHECKPOINT_DIR, filename="step-{step:06d}", auto_insert_metric_name=False,
                         monitor="step", mode="max", save_top_k=keep, every_n_train_steps=every_n_steps or None,
                         save_on_exception=True, save_on_train_epoch_end=False, enable_version_counter=False)
        self.saved_on_signal: Optional[Path] = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):  # a crash mid-step leaves no consistent state to save
            return
        if trainer.world_size > 1:  # saving needs every rank at a barrier, and ranks stop at different collectives
            log.warning("stopped by a signal with %d processes: no checkpoint now; the newest periodic one is kept",
                        trainer.world_size)
            return
        super().on_exception(trainer, pl_module, exception)
        self.saved_on_signal = Path(self.format_checkpoint_name(self._monitor_candidates(trainer)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return  # checkpoints are counted in steps only

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return


def checkpoint_callbacks(cfg: Any, run_dir: Path) -> list[pl.Callback]:
    """The callbacks that make a run resumable (none when ``checkpoint.every_n_steps`` is null and
    signals are not to be caught)."""
    node = cfg.get("checkpoint") or {}
    every = node.get("every_n_steps")
    return [ResumeState(), StepCheckpoints(run_dir, int(every) if every else None, int(node.get("keep", 2)))]
