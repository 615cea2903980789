"""Sweep comparison: table, CSV and plot from job records; resume skips completed jobs."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.sweeps.compare import load_runs, markdown_table, write_comparison
from ftlab.results import write_metrics


def _job(root: Path, num: int, method: str, seed: int, val: float, status: str = "completed") -> None:
    record = {"method": method, "seed": seed, "status": status, "job_num": num, "max_steps": 5,
              "overrides": [f"method={method}", f"seed={seed}", "model=tiny"], "val_loss": val,
              "trainable_params": 100 if method == "lora" else 1000, "peak_rss_mb": 500.0 + num,
              "tokens_per_s": 10.0, "wall_s": 1.0, "train_tokens": 2000}
    if status == "failed":
        record |= {"val_loss": None, "error": "RuntimeError: boom"}
    write_metrics(root / f"{num}_{method}", record)


def _sweep(root: Path) -> Path:
    for num, (method, seed, val) in enumerate(
        [("full", 0, 1.0), ("full", 1, 1.2), ("lora", 0, 2.0), ("lora", 1, 2.2), ("lora", 2, 0.0)]
    ):
        _job(root, num, method, seed, val, status="failed" if num == 4 else "completed")
    for num in range(10, 12):  # job 10 sorts after job 2 by number, before it by name
        _job(root, num, "full", num, 1.1)
    return root


def test_table_groups_by_method_with_mean_and_spread(tmp_path: Path) -> None:
    rows = load_runs([_sweep(tmp_path)])
    assert [r["job_num"] for r in rows] == [0, 1, 2, 3, 4, 10, 11]
    table = markdown_table(rows)
    assert "| method=full | 4 | 0 | 1.1000 ± 0.0816 | 1,000 ± 0 |" in table
    assert "| method=lora | 2 | 1 | 2.1000 ± 0.1414 | 100 ± 0 |" in table
    assert "Budget: max_steps=5, 2,000 training tokens per job" in table
    assert "RuntimeError: boom" in table


def test_write_comparison_files(tmp_path: Path) -> None:
    table = write_comparison([_sweep(tmp_path)], tmp_path / "out")
    with (tmp_path / "out" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3", "4", "10", "11"]
    assert rows[4]["status"] == "failed" and rows[4]["error"] == "RuntimeError: boom"
    png = (tmp_path / "out" / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "out" / "comparison.md").read_text() == table


def test_compare_cli_across_sweeps(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _job(a, 0, "lora", 0, 2.0)
    _job(b, 0, "full", 0, 1.0)
    out = subprocess.run([sys.executable, "-m", "ftlab", "compare", str(a), str(b), "--out", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "method=lora" in out.stdout and "method=full" in out.stdout
    assert (tmp_path / "c" / "comparison.png").exists()
    missing = subprocess.run([sys.executable, "-m", "ftlab", "compare", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "nope: no such sweep folder" in missing.stderr


def test_jobs_that_did_not_finish_are_listed(tmp_path: Path) -> None:
    """A grid sweep's jobs that never ran (no folder), were killed (a ``running`` record nobody
    holds, or a folder without a record) or were interrupted are counted and listed by their values."""
    from omegaconf import OmegaConf

    OmegaConf.save({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                          "params": None},
                              "overrides": {"task": ["model=tiny", "method=full,lora", "seed=0,1"]}}},
                   tmp_path / "multirun.yaml")
    _job(tmp_path, 0, "full", 0, 1.0)
    _job(tmp_path, 1, "full", 1, 1.0, status="running")  # its process was SIGKILLed
    write_metrics(tmp_path / "2_lora", {"method": "lora", "seed": 0, "status": "interrupted", "job_num": 2, "steps": 7,
                                        "checkpoint": "/x/step-000007.ckpt", "overrides": ["method=lora", "seed=0"]})
    table = markdown_table(load_runs([tmp_path]))
    assert "| method=full | 1 | 0 | 0 | 1 | 0 |" in table  # completed, failed, interrupted, killed, not run
    assert "| method=lora | 0 | 0 | 1 | 0 | 1 |" in table
    assert "- killed: method=full seed=1" in table
    assert "- interrupted: method=lora seed=0 (at step 7, checkpoint /x/step-000007.ckpt)" in table
    assert "- not run: method=lora seed=1" in table
    # control: with every job recorded completed, nothing is listed as unfinished
    for num, (method, seed) in enumerate([("full", 1), ("lora", 0), ("lora", 1)], start=1):
        _job(tmp_path, num, method, seed, 1.0)
    assert "Did not finish" not in markdown_table(load_runs([tmp_path]))


@pytest.mark.slow  # a subprocess sweep of many jobs: CI runs it, the quick loop does not
def test_sweep_writes_comparison_and_resume_skips_completed_jobs(tmp_path: Path, cache_dir: Path) -> None:
    args = [sys.executable, "-m", "ftlab", "-m", "method=full,lora,qlora", "seed=0,1", "model=tiny",
            "trainer.max_steps=3", "data.num_train=48", "data.num_val=16", f"paths.cache_dir={cache_dir}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    for name in ("results.csv", "comparison.md", "comparison.png"):
        assert (sweep / name).exists(), name
    table = (sweep / "comparison.md").read_text()
    for method in ("full", "lora", "qlora"):
        assert f"| method={method} | 2 | 0 |" in table

    # an interrupted sweep: two jobs never finished
    interrupted = [sweep / "1_full" / "metrics.json", sweep / "4_qlora" / "metrics.json"]
    mtimes = {p: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json") if p not in interrupted}
    for p in interrupted:
        p.unlink()
    listed = markdown_table(load_runs([sweep]))  # job folders without a record: killed before they started
    assert "- killed: method=full seed=1" in listed and "- killed: method=qlora seed=0" in listed
    second = subprocess.run([*args, "resume=true"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming the sweep in {sweep.relative_to(tmp_path)}" in second.stderr
    assert second.stderr.count("already completed, skipping") + second.stdout.count("already completed, skipping") == 4
    for p in interrupted:
        assert json.loads(p.read_text())["status"] == "completed"
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items()), "a completed job was re-run"
    assert list((tmp_path / "outputs" / "multirun").iterdir()) == [sweep]


@pytest.mark.slow  # a subprocess sweep of many jobs: CI runs it, the quick loop does not
def test_optuna_search_reports_best_trial(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "optuna"
    out = subprocess.run(
        [sys.executable, "-m", "ftlab", "-m", "+sweep=optuna", "method=lora", "model=tiny", "trainer.max_steps=2",
         "data.num_train=48", "data.num_val=16", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}",
         f"paths.cache_dir={cache_dir}"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Best parameters: {'method.lr':" in out.stdout + out.stderr
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_value" in best
    values = [json.loads(p.read_text())["val_loss"] for p in sweep.glob("*/metrics.json")]
    assert len(values) == 3
    assert f"best_value: {min(values)}" in best
    assert (sweep / "comparison.md").exists()


@pytest.mark.slow  # a subprocess sweep of many jobs: CI runs it, the quick loop does not
def test_optuna_prunes_a_bad_trial_and_records_it(tmp_path: Path, cache_dir: Path) -> None:
    # lr=1e-7 barely moves the loss: once two trials have finished, it is worse than their median
    # at step 2 and its job stops there; lr=3e-3 trials run the full 6 steps.
    sweep = tmp_path / "pruned"
    out = subprocess.run(
        [sys.executable, "-m", "ftlab", "-m", "+sweep=optuna", "method=lora", "model=tiny", "trainer.max_steps=6",
         "trainer.val_check_interval=2", "data.num_train=48", "data.num_val=16", "method.lr=choice(0.003,0.0000001)",
         "hydra.sweeper.n_trials=6", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache_dir}"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = load_runs([sweep])
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned and all(r["steps"] == r["pruned_at_step"] == 2 for r in pruned)
    assert all("method.lr=1e-07" in r["overrides"] for r in pruned)
    assert all(r["steps"] == 6 for r in rows if r["status"] == "completed")
    assert "Failed experiment" not in out.stdout + out.stderr
    assert "Best parameters: {'method.lr': 0.003}" in out.stdout + out.stderr
    table = (sweep / "comparison.md").read_text()
    assert "| run | completed | failed | pruned |" in table


def test_pruned_trial_is_told_to_optuna_as_pruned() -> None:
    import optuna
    import torch
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from ftlab.sweeps.pruning import OptunaPruning, track_trial

    study = optuna.create_study()
    cfg = OmegaConf.create({"pruner": {"_target_": "optuna.pruners.ThresholdPruner", "upper": 1.0}})
    good, bad = study.ask(), study.ask()
    track_trial(cfg, good)
    track_trial(cfg, bad)
    assert isinstance(study.pruner, optuna.pruners.ThresholdPruner)
    for trial, loss in [(good, 0.5), (bad, 5.0)]:
        trainer = SimpleNamespace(callback_metrics={"val/loss": torch.tensor(loss)}, sanity_checking=False,
                                  global_step=3, should_stop=False)
        callback = OptunaPruning(trial)
        callback.on_validation_end(trainer, None)
        assert trainer.should_stop == (trial is bad)
        assert callback.pruned_at_step == (3 if trial is bad else None)
        study.tell(trial, loss)  # what the sweeper does with the job's return value
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert study.best_value == 0.5


def test_pruner_null_turns_pruning_off() -> None:
    import optuna
    from omegaconf import OmegaConf

    from ftlab.sweeps.pruning import track_trial

    study = optuna.create_study()
    track_trial(OmegaConf.create({"pruner": None}), study.ask())
    assert isinstance(study.pruner, optuna.pruners.NopPruner)


@pytest.mark.slow
def test_one_sweep_compares_supervised_preference_and_rl_methods(tmp_path: Path, cache_dir: Path) -> None:
    """`-m method=sft,dpo,orpo,ppo,grpo` on the preference data: one table, each method with the
    metric that judges it (preference accuracy for all causal LMs, mean reward for the RL ones)."""
    args = [sys.executable, "-m", "ftlab", "-m", "method=sft,dpo,orpo,ppo,grpo", "model=tiny", "data=preference",
            "trainer.max_steps=2", "data.num_train=32", "data.num_val=8", "data.batch_size=4", "eval.num_prompts=4",
            "logger=none", f"paths.cache_dir={cache_dir}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    rows = {re.search(r"method=(\w+)", r["overrides"]).group(1): r for r in csv.DictReader((sweep / "results.csv").open())}
    assert set(rows) == {"sft", "dpo", "orpo", "ppo", "grpo"}
    assert rows["sft"]["method"] == "lora"  # a preset runs its base method
    assert all(r["status"] == "completed" for r in rows.values())
    assert all(r["preference_accuracy"] for r in rows.values())  # every model is scored on the held-out pairs
    assert rows["ppo"]["mean_reward"] and rows["grpo"]["base_mean_reward"] and not rows["dpo"]["mean_reward"]
    table = (sweep / "comparison.md").read_text()
    assert "mean reward" in table and "preference acc" in table and "compare those by mean reward" in table
    for method in rows:
        assert f"| method={method} | 1 | 0 |" in table


def test_the_objective_a_job_returns_is_the_named_metric(caplog: pytest.LogCaptureFixture) -> None:
    import math

    from omegaconf import OmegaConf

    from ftlab.train import _prunable, objective_value

    record = {"val_loss": 0.01, "mean_reward": 0.75, "status": "completed", "preference": {"pairs": 8}}
    assert objective_value(OmegaConf.create({}), record) == 0.01  # val_loss by default
    rl = OmegaConf.create({"objective": "mean_reward"})
    assert objective_value(rl, record) == 0.75
    assert not _prunable(rl) and _prunable(OmegaConf.create({"objective": "val_loss"}))
    with caplog.at_level("WARNING", logger="ftlab"):
        assert math.isnan(objective_value(OmegaConf.create({"objective": "mean_rewrd"}), record))
    assert "objective=mean_rewrd: the run record has no number under that name (it has: mean_reward, val_loss)" \
        in caplog.text


@pytest.mark.slow
def test_a_signal_stops_the_sweep_which_lists_what_did_not_run_and_resumes(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "ftlab", "-m", "seed=0,1", "model=tiny", "trainer.max_steps=4", "eval.generate=false",
            "checkpoint.every_n_steps=2", "data.num_train=48", "data.num_val=16", "logger=none",
            f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"]
    stop = ["+callbacks.stop._target_=ftlab.testing.SignalAt", "+callbacks.stop.step=3", "+callbacks.stop.signal=SIGTERM"]
    first = subprocess.run([*args, *stop], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert first.returncode == 143, first.stderr[-3000:]  # not 0: a scheduler must not record success
    table = (sweep / "comparison.md").read_text()
    assert "- interrupted: seed=0 (at step 3, checkpoint" in table and "- not run: seed=1" in table
    second = subprocess.run([*args, "resume=true"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    records = [json.loads((sweep / f"{n}_lora" / "metrics.json").read_text()) for n in (0, 1)]
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert records[0]["resumed_from"].endswith("step-000003.ckpt") and "resumed_from" not in records[1]
    assert "Did not finish" not in (sweep / "comparison.md").read_text()


def test_budget_states_the_global_batch() -> None:
    """Jobs on other world sizes are comparable per optimizer step only with their global batch said."""
    from ftlab.sweeps.compare import budget

    rows = [{"max_steps": 5, "train_tokens": 100, "global_batch_size": 8},
            {"max_steps": 5, "train_tokens": 100, "global_batch_size": 16}]
    assert budget(rows) == "max_steps=5, global batch 8, 16, 100 training tokens per job"
    assert budget([{"max_steps": 5}]) == "max_steps=5"


def test_comparison_files_are_replaced_whole(tmp_path: Path, monkeypatch) -> None:
    """A comparison written again over an old one (a resumed sweep) replaces each file at once: a
    crash mid-write leaves the previous file, never half of one, and no temporary file."""
    import matplotlib.figure

    out, sweep = tmp_path / "out", _sweep(tmp_path)
    write_comparison([sweep], out)
    before = (out / "comparison.png").read_bytes()

    def broken(self, fname, **kwargs):
        fname.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        write_comparison([sweep], out)
    assert (out / "comparison.png").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["comparison.md", "comparison.png", "results.csv"]
