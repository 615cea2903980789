"""Sweeps through hydra-submitit-launcher: ftlab's presets ``hydra/launcher=submitit_slurm`` and
``submitit_local`` (ftlab/conf/hydra/launcher/), the comparison written by the launching process,
and ``resume=true`` across launcher restarts.

``submitit_local`` runs each job in its own process, as a cluster would (the job, with Hydra's
callbacks, is pickled to disk and loaded again there), so it tests everything ``submitit_slurm``
does except ``sbatch``. The end-to-end tests run ``python -m ftlab`` in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install ftlab[sweeps]")

TINY = ["model=tiny", "data.num_train=48", "data.num_val=16", "trainer.limit_val_batches=1", "trainer.precision=32-true"]
SWEEP = ["-m", "hydra/launcher=submitit_local", "method=lora,full", "trainer.max_steps=2", *TINY]
JOBS = {"0_lora": "lora", "1_full": "full"}


def _ftlab(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "ftlab", *args, f"paths.cache_dir={cache}"], capture_output=True,
                          text=True, timeout=600, env=env)


def _job_logs(sweep: Path) -> dict[str, str]:
    """submitit's folder of each job it ran, by job id: that job's stdout and stderr."""
    logs = {}
    for folder in (sweep / ".submitit").iterdir():
        if re.fullmatch(r"\d+(_\d+)?", folder.name):  # a local job's id is its process id
            logs[folder.name] = "".join(p.read_text() for p in sorted(folder.glob("*_log.*")))
    return logs


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-job sweep through submitit_local, shared by the tests of this module (in order)."""
    folder = tmp_path_factory.mktemp("submitit") / "sweep"
    return folder, _ftlab(*SWEEP, f"hydra.sweep.dir={folder}", cache=cache_dir)


@pytest.mark.slow  # two sweeps: a launcher and two job processes each, every one importing torch
def test_submitit_local_runs_each_job_in_its_own_process_and_the_launcher_compares(sweep) -> None:
    folder, out = sweep
    assert out.returncode == 0, out.stderr[-3000:]
    for name, method in JOBS.items():
        record = json.loads((folder / name / "metrics.json").read_text())
        assert record["status"] == "completed", record.get("error")
        assert record["method"] == method and record["steps"] == 2
    logs = _job_logs(folder)
    assert len(logs) == 2  # one process per sweep job, each with its own log (its id is the pid) ...
    assert all("Job completed successfully" in log for log in logs.values())
    assert "run record:" not in out.stdout + out.stderr  # ... where the jobs logged, not in the launcher
    # the comparison: written by CompareSweep (hydra/default.yaml's callback) in the launching
    # process, after both jobs ended; without that callback there is no comparison.md at all
    table = (folder / "comparison.md").read_text()
    assert "| method=lora | 1 | 0 |" in table and "| method=full | 1 | 0 |" in table
    assert "| method=lora | 1 | 0 |" in out.stdout  # printed by the launcher, not by a job
    rows = (folder / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and [r.split(",")[1] for r in rows[1:]] == ["lora", "full"]


@pytest.mark.slow
def test_resume_with_submitit_local_skips_the_completed_jobs(sweep, cache_dir: Path) -> None:
    folder, first = sweep
    assert first.returncode == 0, first.stderr[-3000:]
    before = {name: (folder / name / "metrics.json").read_bytes() for name in JOBS}
    jobs_before = set(_job_logs(folder))
    out = _ftlab(*SWEEP, f"hydra.sweep.dir={folder}", "resume=true", cache=cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    new = {k: v for k, v in _job_logs(folder).items() if k not in jobs_before}
    assert len(new) == 2  # the launcher submitted both jobs again ...
    skipped = sorted({m.group(1) for log in new.values()
                     for m in re.finditer(r"resume: \S+/(\d+_\w+) already completed, skipping it", log)})
    assert skipped == sorted(JOBS)  # ... and each one found its run completed and did not train
    for name in JOBS:  # a retrained job would rewrite its record (wall_s, peak memory, ...)
        assert (folder / name / "metrics.json").read_bytes() == before[name]
    assert "| method=lora | 1 | 0 |" in out.stdout and "| method=full | 1 | 0 |" in out.stdout


def test_resume_finds_the_newest_sweep_made_with_the_same_launcher(tmp_path: Path, monkeypatch) -> None:
    """``resume=true`` without ``hydra.sweep.dir=``: Hydra records ``hydra/launcher=...`` and
    ``hydra.launcher.*`` among the sweep's hydra overrides, not its task overrides."""
    from omegaconf import OmegaConf

    from ftlab import cli

    monkeypatch.chdir(tmp_path)
    task = ["method=lora,full", "trainer.max_steps=2"]
    launcher = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"]
    for name, overrides in (("2026-01-01_00-00-00", task), ("2026-01-02_00-00-00", [*task, "seed=1"])):
        sweep = tmp_path / "outputs" / "multirun" / name
        sweep.mkdir(parents=True)
        OmegaConf.save({"hydra": {"overrides": {"task": overrides, "hydra": [*launcher, "hydra.mode=MULTIRUN"]}}},
                       sweep / "multirun.yaml")
    found = cli._resume_sweep_dir(["-m", *launcher, *task, "resume=true"])
    assert found == ["hydra.sweep.dir=outputs/multirun/2026-01-01_00-00-00"]
    assert cli._resume_sweep_dir(["-m", *task, "resume=true"]) == found  # control: without the launcher


def test_the_compare_callback_travels_with_a_job_while_it_holds_the_sweep(tmp_path: Path) -> None:
    """submitit pickles the launcher, Hydra's callbacks included, for each job: CompareSweep must
    pickle while it holds the sweep folder's lock (which stays with the launching process)."""
    import cloudpickle
    from omegaconf import OmegaConf

    from ftlab.locks import is_held
    from ftlab.sweeps.callback import CompareSweep

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback = CompareSweep()
    callback.on_multirun_start(config)
    try:
        copy = cloudpickle.loads(cloudpickle.dumps(callback))
        assert isinstance(copy, CompareSweep) and is_held(tmp_path)
    finally:
        callback.on_multirun_end(config)
    assert not is_held(tmp_path)


def test_submitit_slurm_preset_composes_with_the_user_settings(cache_dir: Path) -> None:
    from ftlab.config import compose
    from ftlab.errors import ConfigError

    launcher = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"]
    cfg = compose([*launcher, "hydra.launcher.tasks_per_node=4", "trainer.devices=4", "hydra.sweep.dir=/sweeps/a",
                   f"paths.cache_dir={cache_dir}"], return_hydra_config=True)
    node = cfg.hydra.launcher
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    assert node._target_.endswith("SlurmLauncher")
    assert (node.partition, node.gpus_per_node, node.tasks_per_node, node.nodes) == ("gpu", 4, 4, 1)
    assert (node.timeout_min, node.mem_gb, node.cpus_per_task, node.array_parallelism) == (240, 64, 8, 256)  # ftlab's
    assert node.submitit_folder == "/sweeps/a/.submitit/%j"  # the logs live in the sweep folder
    assert node.qos is None  # the plugin's schema is there too: its other fields can be set
    with pytest.raises(ConfigError, match="did you mean hydra.launcher.partition"):
        compose(["hydra/launcher=submitit_slurm", "hydra.launcher.partitoin=gpu"], return_hydra_config=True)
    local = compose(["hydra/launcher=submitit_local"], return_hydra_config=True).hydra.launcher
    assert local._target_.endswith("LocalLauncher") and (local.tasks_per_node, local.timeout_min) == (1, 1440)
