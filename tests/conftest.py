"""Shared fixtures: composed configs that write into tmp folders and share one model cache."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest
from omegaconf import DictConfig

from ftlab.config import compose


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session: tiny checkpoints are materialized once."""
    return tmp_path_factory.mktemp("ftlab-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir: Path) -> Path:
    """The tiny random Llama written once as a checkpoint folder (weights and tokenizer)."""
    from omegaconf import OmegaConf

    from ftlab.models.tiny import TINY_DEFAULTS, tiny_checkpoint

    return tiny_checkpoint(OmegaConf.create({"name": "tiny", "kind": "tiny", **TINY_DEFAULTS}), cache_dir)


@pytest.fixture
def one_thread():
    """Tiny ops run fastest on one thread; two OpenMP threads on a busy machine spin-wait.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from ftlab.testing import one_thread as single_thread

    with single_thread():
        yield


@pytest.fixture
def tiny_cfg(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """Compose a short run on model=tiny whose outputs go to tmp_path."""

    def make(*overrides: str, steps: int = 3) -> DictConfig:
        base: Sequence[str] = (
            "model=tiny",
            "logger=none",
            "callbacks=none",
            "trainer.precision=32-true",  # pinned: precision=auto would make results depend on the CPU
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
            "data.num_train=64",
            "data.num_val=16",
            "data.batch_size=4",
            "eval.num_prompts=4",
            "eval.num_samples=2",
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.cache_dir={cache_dir}",
        )
        keys = {o.split("=", 1)[0] for o in overrides}
        return compose([*(b for b in base if b.split("=", 1)[0] not in keys), *overrides])

    return make
