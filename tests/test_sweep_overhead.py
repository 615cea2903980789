"""Jobs of a method sweep share the base model's score: the second job reads it, gets the same
metrics as the job that computed it, and anything that changes the score computes it again."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

import ftlab.build as build
from ftlab.data.datamodule import FineTuneDataModule
from ftlab.results import read_metrics
from ftlab.train import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # three short training runs: CI, not the quick loop

SAME = ("val_loss", "train_losses", "exact_match", "base_exact_match", "generation", "steps", "trainable_params")


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``score_generations`` calls made through ``ftlab.build`` (base and fine-tuned scores)."""
    calls: list[int] = []
    real = build.score_generations

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "score_generations", counted)
    return calls


def _job(tiny_cfg: Callable, tmp_path: Path, name: str, *overrides: str) -> dict[str, Any]:
    cfg = tiny_cfg(f"paths.output_dir={tmp_path / name}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "trainer.limit_val_batches=1", *overrides, steps=1)
    train(cfg)
    return read_metrics(tmp_path / name)


def test_second_job_reads_the_base_score_and_matches(tiny_cfg: Callable, tmp_path: Path, generations: list[int]) -> None:
    first = _job(tiny_cfg, tmp_path, "first")
    assert len(generations) == 2  # base, then fine-tuned
    second = _job(tiny_cfg, tmp_path, "second")
    assert len(generations) == 3  # fine-tuned only: the base score came from the cache
    assert {k: second[k] for k in SAME} == {k: first[k] for k in SAME}
    assert first["status"] == second["status"] == "completed"
    other = _job(tiny_cfg, tmp_path, "other", "method=ia3")  # another method, same base: still read
    assert len(generations) == 4 and other["base_exact_match"] == first["base_exact_match"]


def test_what_changes_the_base_score_computes_it_again(tiny_cfg: Callable, tmp_path: Path,
                                                       generations: list[int]) -> None:
    cfg = tiny_cfg(f"paths.cache_dir={tmp_path / 'cache'}")
    _, base, tokenizer = build.load_base(cfg)

    def base_score(*overrides: str) -> Any:
        changed = tiny_cfg(f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
        model = base if not any(o.startswith("model.") for o in overrides) else build.load_base(changed)[1]
        return build.score_base(changed, model, tokenizer, FineTuneDataModule(changed.data))

    first = base_score()
    assert base_score() == first and len(generations) == 1
    for n, change in enumerate(["eval.max_new_tokens=3", "eval.checker=normalized", "eval.num_prompts=3",
                                "model.hidden_size=32"], start=2):
        base_score(change)
        assert len(generations) == n, change
