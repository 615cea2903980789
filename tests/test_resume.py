"""Interrupted runs: checkpoints, signals, resumption, folder locks, the run manifest and rerun.

The end-to-end tests run ``python -m ftlab`` in a subprocess, as a user's shell or a scheduler
would, and interrupt it at a known step with ``ftlab.testing.SignalAt``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftlab.checkpoints import AtomicCheckpointIO, newest_checkpoint, resolve_ckpt_path, verify_checkpoint
from ftlab.data.resumable import ResumableLoader
from ftlab.errors import ConfigError, FolderBusyError
from ftlab.locks import hold_folder, is_held

RUN = ["model=tiny", "trainer.max_steps=12", "checkpoint.every_n_steps=4", "trainer.deterministic=true",
       "trainer.val_check_interval=6", "eval.generate=false", "logger=none", "data.num_train=96", "data.num_val=16"]


def _ftlab(*args: str, cwd: Path, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "ftlab", *args, f"paths.cache_dir={cache}"], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def _stop_at(step: int, sig: str) -> list[str]:
    return ["+callbacks.stop._target_=ftlab.testing.SignalAt", f"+callbacks.stop.step={step}", f"+callbacks.stop.signal={sig}"]


def _record(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# -- checkpoint files ---------------------------------------------------------------------------------


def _write(folder: Path, step: int, value: float) -> Path:
    path = folder / "checkpoints" / f"step-{step:06d}.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((64,), value)}}, path)
    return path


def test_newest_valid_checkpoint_is_found_and_a_damaged_one_falls_back(tmp_path: Path, caplog) -> None:
    older, newest = _write(tmp_path, 4, 1.0), _write(tmp_path, 8, 2.0)
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # nothing left of the temporary files
    assert newest_checkpoint(tmp_path) == newest  # control: both intact, the newest wins
    data = bytearray(newest.read_bytes())
    data[-40] ^= 0xFF  # same size, one byte changed
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        assert newest_checkpoint(tmp_path) == older
    assert "step-000008.ckpt is damaged" in caplog.text and "does not match the sha256" in caplog.text
    older.write_bytes(older.read_bytes()[:100])  # truncated
    assert "truncated" in verify_checkpoint(older)
    assert newest_checkpoint(tmp_path) is None


def test_a_checkpoint_without_its_hash_file_is_not_trusted(tmp_path: Path) -> None:
    path = _write(tmp_path, 4, 1.0)
    Path(str(path) + ".sha256").unlink()  # the writer died between the file and its hash
    assert "did not finish" in verify_checkpoint(path)
    assert newest_checkpoint(tmp_path) is None


def test_ckpt_path_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ckpt_path=.*no such file or run folder"):
        resolve_ckpt_path(tmp_path / "nope.ckpt", tmp_path, resume=False)
    with pytest.raises(ConfigError, match="no valid checkpoint in"):
        resolve_ckpt_path(tmp_path, tmp_path, resume=False)
    path = _write(tmp_path, 4, 1.0)
    assert resolve_ckpt_path(tmp_path, tmp_path, resume=False) == path  # a run folder: its newest
    assert resolve_ckpt_path(None, tmp_path, resume=False) is None  # no resume, no ckpt_path: from scratch
    assert resolve_ckpt_path(None, tmp_path, resume=True) == path


# -- data position ------------------------------------------------------------------------------------


def test_resumable_loader_continues_an_epoch_with_the_same_batches() -> None:
    data = list(range(50))

    def loader() -> ResumableLoader:
        return ResumableLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7))

    full = loader()
    first, second = [b.tolist() for b in full], [b.tolist() for b in full]  # two epochs
    assert first != second  # control: each epoch is shuffled anew
    # a run that stopped after 5 batches of the second epoch
    state = loader()
    list(state)
    epoch_two_start = None
    for i, _ in enumerate(state):
        epoch_two_start = state.epoch_start_state
        if i == 4:
            break
    resumed = loader()  # a new process: a fresh loader, told where the checkpoint was
    resumed.resume_at(epoch_two_start, 5)
    assert [b.tolist() for b in resumed] == second[5:]
    assert len(list(resumed)) == len(second)  # the epoch after it is a whole one again
    assert [b.tolist() for b in loader()][5:] != second[5:]  # control: a fresh loader starts epoch one


# -- locks --------------------------------------------------------------------------------------------


def test_a_second_process_cannot_train_into_a_held_folder(tmp_path: Path) -> None:
    with hold_folder(tmp_path, "sweep"):
        assert is_held(tmp_path)
        probe = subprocess.run([sys.executable, "-c", "from ftlab.locks import hold_folder\n"
                                f"with hold_folder({str(tmp_path)!r}, 'sweep'): pass"],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode != 0
        assert "FolderBusyError" in probe.stderr and f"pid {os.getpid()}" in probe.stderr
    assert not is_held(tmp_path)  # released when the block ends
    with hold_folder(tmp_path):  # and can be taken again
        pass


def test_a_killed_holder_leaves_the_folder_free(tmp_path: Path) -> None:
    code = (f"import os, signal\nfrom ftlab.locks import hold_folder\n"
            f"with hold_folder({str(tmp_path)!r}):\n    os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -signal.SIGKILL
    assert not is_held(tmp_path)


def test_hold_folder_refuses_in_the_same_process(tmp_path: Path) -> None:
    with hold_folder(tmp_path):
        with pytest.raises(FolderBusyError, match="another ftlab process is training into this run folder"):
            with hold_folder(tmp_path):
                pass


# -- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_ends_at_the_uninterrupted_loss(tmp_path: Path, cache_dir: Path) -> None:
    """Tolerance: none. On one machine a resumed deterministic run repeats the uninterrupted run's
    losses bit for bit (same batches, same dropout masks, same optimizer state)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _ftlab(*RUN, f"hydra.run.dir={whole}", cwd=tmp_path, cache=cache_dir).returncode == 0
    killed = _ftlab(*RUN, *_stop_at(6, "SIGKILL"), f"hydra.run.dir={cut}", cwd=tmp_path, cache=cache_dir)
    assert killed.returncode == -signal.SIGKILL
    assert _record(cut)["status"] == "running"  # what a killed run leaves: its record never got an ending
    assert [p.name for p in sorted((cut / "checkpoints").glob("*.ckpt"))] == ["step-000004.ckpt"]
    resumed = _ftlab(*RUN, f"hydra.run.dir={cut}", "resume=true", cwd=tmp_path, cache=cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _record(whole), _record(cut)
    assert b["status"] == "completed" and b["resumed_from"].endswith("step-000004.ckpt")
    assert b["train_losses"] == a["train_losses"] and len(a["train_losses"]) == 12
    assert b["val_loss"] == a["val_loss"]
    assert not (cut / "checkpoints").exists()  # a completed run drops its checkpoints
    # control: a run from scratch with another seed does not match, so the comparison can fail
    other = _ftlab(*RUN, "seed=1", f"hydra.run.dir={tmp_path / 'other'}", cwd=tmp_path, cache=cache_dir)
    assert other.returncode == 0 and _record(tmp_path / "other")["train_losses"] != a["train_losses"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_checkpoints_records_interrupted_and_exits_with_its_status(
        tmp_path: Path, cache_dir: Path, sig: str, status: int) -> None:
    run = tmp_path / "run"
    result = _ftlab(*RUN, *_stop_at(6, sig), f"hydra.run.dir={run}", cwd=tmp_path, cache=cache_dir)
    assert result.returncode == status, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ftlab:")]
    assert len(lines) == 1 and f"interrupted by {sig} at step 6" in lines[0] and "resume=true" in lines[0]
    assert "Traceback" not in result.stderr
    record = _record(run)
    assert record["status"] == "interrupted" and record["signal"] == sig and record["steps"] == 6
    assert record["checkpoint"].endswith("step-000006.ckpt") and Path(record["checkpoint"]).is_file()
    assert len(record["train_losses"]) == 6
    assert not (run / "adapter").exists()  # nothing presented as a result


def test_sigterm_exits_143_with_a_checkpoint(tmp_path: Path, cache_dir: Path) -> None:
    """The quick loop's version of the signal test: a 4-step run stopped at step 2."""
    run = tmp_path / "run"
    short = [o for o in RUN if not o.startswith(("trainer.max_steps", "trainer.val_check"))]
    result = _ftlab(*short, "trainer.max_steps=4", *_stop_at(2, "SIGTERM"), f"hydra.run.dir={run}", cwd=tmp_path,
                    cache=cache_dir)
    assert result.returncode == 143, result.stderr[-2000:]
    record = _record(run)
    assert record["status"] == "interrupted" and Path(record["checkpoint"]).name == "step-000002.ckpt"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 0 and "trainer.max_steps=4" in manifest["overrides"]
    assert manifest["packages"]["torch"] == torch.__version__.split("+")[0] or manifest["packages"]["torch"] == torch.__version__
    assert manifest["data"]["train_examples"] > 0 and len(manifest["data"]["train"]) == 64
    assert manifest["config"]["trainer"]["max_steps"] == 4


def test_resume_refuses_a_sweep_another_process_is_training(tmp_path: Path, monkeypatch) -> None:
    from omegaconf import OmegaConf

    from ftlab import cli

    sweep = tmp_path / "outputs" / "multirun" / "2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    OmegaConf.save({"hydra": {"overrides": {"task": ["method=full,lora", "resume=true"]}}}, sweep / "multirun.yaml")
    monkeypatch.chdir(tmp_path)
    args = ["-m", "method=full,lora", "resume=true"]
    assert cli._resume_sweep_dir(args) == [f"hydra.sweep.dir={sweep.relative_to(tmp_path)}"]  # control: free
    with hold_folder(sweep, "sweep"):
        with pytest.raises(FolderBusyError, match="another ftlab process is still training this sweep"):
            cli._resume_sweep_dir(args)


def test_rerun_repeats_the_overrides_and_names_what_differs(tmp_path: Path, capsys) -> None:
    from ftlab.deploy.rerun import differences, rerun_run
    from ftlab.errors import FtlabError
    from ftlab.manifest import environment

    now = environment()
    then = json.loads(json.dumps(now))
    assert differences(then, now) == []  # control: the same machine
    then["packages"]["torch"] = "2.0.0"
    then["hardware"]["cpu"]["flags"] = ["avx2"]
    lines = differences(then, now)
    assert any(line.startswith(f"torch {now['packages']['torch']} here, 2.0.0 when it ran") for line in lines)
    assert any(line.startswith("CPU flags") for line in lines)

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({**then, "overrides": ["model=tiny", "method.lr=0.1", "resume=true",
                                                                         "hydra.run.dir=x"]}))
    calls = []
    rerun_run(run, ["method.lr=0.2"], calls.append)
    (args,) = calls
    assert args[:2] == ["model=tiny", "method.lr=0.2"] and args[2].startswith("hydra.run.dir=outputs/runs/")
    assert "rerun_run" in args[2] and "note: torch" in capsys.readouterr().out
    with pytest.raises(FtlabError, match="no manifest.json"):
        rerun_run(tmp_path, [], calls.append)
