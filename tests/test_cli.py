"""The command line as users run it: single runs, sweeps, loggers (subprocesses, like a user's shell)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["model=tiny", "data.num_train=48", "data.num_val=16", "trainer.limit_val_batches=1"]


def _ftlab(*args: str, cache: Path, entry: list[str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = entry or [sys.executable, "-m", "ftlab"]
    return subprocess.run(
        [*cmd, *args, f"paths.cache_dir={cache}"], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow  # a subprocess sweep of many jobs: CI runs it, the quick loop does not
def test_multirun_over_every_registered_method(tmp_path: Path, cache_dir: Path) -> None:
    from ftlab.registry import get_registry

    methods = sorted(get_registry().methods)
    assert len(methods) >= 16
    sweep = tmp_path / "sweep"
    # preference data: SFT methods train on the chosen answers, preference methods on the pairs,
    # RL methods on the prompts, so every method runs on one data set
    out = _ftlab("-m", f"method={','.join(methods)}", "data=preference", "trainer.max_steps=3",
                 f"hydra.sweep.dir={sweep}", *TINY, cache=cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_", 1)[0]))
    assert [p.name for p in jobs] == [f"{i}_{m}" for i, m in enumerate(methods)]
    for job, method in zip(jobs, methods):
        record = json.loads((job / "metrics.json").read_text())
        assert record["status"] == "completed", (method, record.get("error"))
        assert record["method"] == method and record["choices"]["method"] == method
        assert record["steps"] == 3
        for key in ("train_loss_first", "train_loss_last", "val_loss", "trainable_params", "total_params",
                    "peak_rss_mb", "tokens_per_s", "wall_s", "artifact_mb"):
            assert isinstance(record[key], (int, float)), (method, key)
        assert (job / ".hydra" / "config.yaml").exists()
        assert (job / "csv" / "metrics.csv").exists()
    by_method = dict(zip(methods, jobs))
    qlora = json.loads((by_method["qlora"] / "metrics.json").read_text())
    assert qlora["quantized_linear"]["linear4bit"] > 0
    assert (by_method["qlora"] / "adapter" / "adapter_model.safetensors").exists()
    assert (by_method["full"] / "model" / "model.safetensors").exists()
    table = (sweep / "comparison.md").read_text()
    assert all(f"| method={m} | 1 | 0 |" in table for m in methods)


def test_console_script_train_subcommand(tmp_path: Path, cache_dir: Path) -> None:
    script = shutil.which("ftlab", path=str(Path(sys.executable).parent))
    assert script, "the ftlab console script is not installed"
    out = _ftlab("train", "method=lora", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}", *TINY,
                 cache=cache_dir, entry=[script])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "completed"


def test_single_run_input_error_is_one_line_and_recorded(tmp_path: Path, cache_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    out = _ftlab("method=lora", f"data.path={bad}", f"hydra.run.dir={tmp_path / 'run'}", *TINY, cache=cache_dir)
    assert out.returncode != 0
    assert f"ftlab: error: {bad} line 2" in out.stderr
    assert "Traceback" not in out.stderr
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "failed" and "line 2" in record["error"]


def test_model_load_error_is_one_line_naming_the_field_and_valid_kinds(tmp_path: Path, cache_dir: Path) -> None:
    out = _ftlab("model=tiny", "model.kind=huge", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}", cache=cache_dir)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("ftlab: error:")]
    assert errors == ["ftlab: error: model.kind=huge: expected one of: tiny | pretrained"], out.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder


def test_failed_job_does_not_abort_the_sweep(tmp_path: Path, cache_dir: Path) -> None:
    sweep = tmp_path / "sweep"
    bad = tmp_path / "bad.jsonl"  # fails when its job reads it: no check before the sweep can see that
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    out = _ftlab("-m", "method=lora", f"data.path={bad},null", "trainer.max_steps=2", f"hydra.sweep.dir={sweep}", *TINY,
                 cache=cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads((sweep / f"{i}_lora" / "metrics.json").read_text()) for i in range(2)]
    assert records[0]["status"] == "failed" and "line 2" in records[0]["error"]
    assert records[1]["status"] == "completed"


@pytest.mark.slow  # two subprocess runs (~20 s): CI runs them, the quick loop keeps its 10-minute budget
@pytest.mark.parametrize("logger,artifact", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_loggers_write_offline(tmp_path: Path, cache_dir: Path, logger: str, artifact: str, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = _ftlab(f"logger={logger}", "method=lora", "trainer.max_steps=2", f"hydra.run.dir={tmp_path}", *TINY,
                 cache=cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    written = list((tmp_path / artifact).rglob("*"))
    assert written, f"{logger} wrote nothing"
    if logger == "wandb":
        assert any(p.name.startswith("offline-run-") for p in written)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path, cache_dir: Path) -> None:
    out = _ftlab("trainer=ddp", "trainer.accelerator=cpu", "method=lora", "trainer.max_steps=3",
                 f"hydra.run.dir={tmp_path}", *TINY, cache=cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out.stdout + out.stderr + (tmp_path / "train_ddp_process_1.log").read_text()
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 3
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow  # a subprocess sweep of many jobs: CI runs it, the quick loop does not
def test_methods_lists_presets_and_sizes_table(tmp_path: Path, cache_dir: Path) -> None:
    listing = subprocess.run([sys.executable, "-m", "ftlab", "methods"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": "200"})
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "method presets" in listing.stdout and "rslora" in listing.stdout and "r=64, alpha=16" in listing.stdout
    table_file = tmp_path / "sizes.md"
    sizes = _ftlab("methods", "--sizes", "model=tiny", "--out", str(table_file), cache=cache_dir)
    assert sizes.returncode == 0, sizes.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in table_file.read_text().splitlines()[2:]}
    assert {"full", "lora", "qlora"} <= set(rows) and "rslora" not in rows  # presets only change fields
    assert "| full | none | 138,048 | 100.000 | model |" in rows["full"]
    assert "| lora | none | 32,768 |" in rows["lora"] and "| adapter |" in rows["lora"]
    assert rows["qlora"].startswith("| qlora | nf4 |")
    assert table_file.read_text() in sizes.stdout
    bad = subprocess.run([sys.executable, "-m", "ftlab", "methods", "model=tiny"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "overrides and --out go with --sizes" in bad.stderr


@pytest.mark.parametrize(("overrides", "message"), [
    (("method=freeze", "method.last_n_blocks=9"), "ftlab: error: method.last_n_blocks=9 must be between 0 and 2"),
    (("scheduler.warmup_ratio=2",), "ftlab: error: scheduler.warmup_ratio=2: expected a number in [0, 1)"),
    (("method=qlora", "quantization.bnb_4bit_compute_dtype=float33"),
     "ftlab: error: quantization.bnb_4bit_compute_dtype=float33: expected one of: auto | float32"),
])
def test_bad_values_are_one_line_not_a_traceback(overrides: tuple[str, ...], message: str, tmp_path: Path,
                                                 cache_dir: Path) -> None:
    out = _ftlab(*overrides, "trainer.max_steps=1", "eval.generate=false", f"hydra.run.dir={tmp_path}", *TINY,
                 cache=cache_dir)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("ftlab: error:")]
    assert len(errors) == 1 and errors[0].startswith(message), out.stderr[-3000:]
