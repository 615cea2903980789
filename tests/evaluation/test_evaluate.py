"""What fine-tuning bought: exact match of base and fine-tuned model in metrics.json, sample
generations at each validation, and ``ftlab eval RUN_DIR`` re-evaluating a finished run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.build import build
from ftlab.evaluation.evaluate import evaluate_run
from ftlab.train import fit, train

TINY = ["model=tiny", "data.num_train=48", "data.num_val=16", "trainer.limit_val_batches=1",
        "eval.num_prompts=6", "eval.num_samples=2", "logger=none", "callbacks=none"]


def test_run_record_has_base_and_finetuned_exact_match(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg("method=lora", "eval.num_prompts=6", "eval.num_samples=2", "trainer.val_check_interval=2", steps=4)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    record = json.loads((out / "metrics.json").read_text())
    assert record["generation"]["prompts"] == 6 and record["generation"]["checker"] == "exact"
    assert 0.0 <= record["exact_match"] <= 1.0 and 0.0 <= record["base_exact_match"] <= 1.0
    assert record["generation"]["finetuned_correct"] == round(record["exact_match"] * 6)
    sample = record["generation"]["samples"][0]
    assert set(sample) >= {"prompt", "reference", "prediction", "correct"}
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 2, 4, 4]  # two samples at each of the two validations


def test_base_score_is_computed_once_per_base_and_data(tiny_cfg, caplog) -> None:
    cfg = tiny_cfg("method=lora", "eval.num_prompts=5")
    with caplog.at_level("INFO", logger="ftlab"):
        first = build(cfg).base_score
        build(tiny_cfg("method=ia3", "eval.num_prompts=5"))  # another method: the same base score
    assert first is not None and first.total == 5
    assert caplog.text.count("base model: exact") == 2 and caplog.text.count("(cached)") == 1


def test_no_generation_scoring_when_switched_off(tiny_cfg, tmp_path: Path) -> None:
    run = build(tiny_cfg("eval.generate=false"))
    assert run.base_score is None
    assert "exact_match" not in fit(run, tmp_path)


def test_unknown_checker_is_named(tiny_cfg) -> None:
    from ftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="exact"):
        build(tiny_cfg("eval.checker=exactly"))


def _ftlab(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftlab", *args, f"paths.cache_dir={cache}"],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_ftlab_eval_reevaluates_a_finished_run(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    out = _ftlab("method=lora", "trainer.max_steps=3", f"hydra.run.dir={run}", *TINY, cache=cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    result = evaluate_run(run)
    assert result["val_loss"] == pytest.approx(record["val_loss"], abs=1e-5)  # the same model on the same data
    assert result["exact_match"] == record["exact_match"] and result["base_exact_match"] == record["base_exact_match"]
    assert json.loads((run / "eval.json").read_text())["val_loss"] == pytest.approx(result["val_loss"])
    other = evaluate_run(run, ["data.num_val=4", "eval.checker=normalized"])
    assert other["generation"]["prompts"] == 4 and other["generation"]["checker"] == "normalized"
    assert other["data"]["val_examples"] == 4


@pytest.mark.slow
def test_ftlab_eval_classification_and_bad_folder(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "cls"
    out = _ftlab("task=classification", "method=linear_probe", "trainer.max_steps=3", f"hydra.run.dir={run}",
                 "model=tiny", "data.num_train=32", "data.num_val=16", "logger=none", "callbacks=none", cache=cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run / "metrics.json").read_text())
    shown = subprocess.run([sys.executable, "-m", "ftlab", "eval", str(run)], capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert f"accuracy {record['accuracy']:.4f}" in shown.stdout and "macro precision" in shown.stdout
    missing = subprocess.run([sys.executable, "-m", "ftlab", "eval", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode == 1 and "not a run folder of ftlab (no .hydra/overrides.yaml)" in missing.stderr
