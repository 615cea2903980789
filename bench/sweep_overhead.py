"""Run: ``python bench/sweep_overhead.py [--models llama tiny] [--methods lora,ia3,loha,lokr] [--max-steps 2] [--num-prompts 50] [--cold] [OVERRIDE ...]``

Where the time of a method sweep goes beyond its training steps, per job.

For each ``--models`` entry it runs ``python -m ftlab -m method=<methods> model=<model>
trainer.max_steps=<max-steps>`` in this process (Hydra's basic launcher, one job after the
other, as the command line does) and times each job's phases by wrapping the functions that do
them: config composition (``load_sweep_config``), Hydra's job set-up (run folder, ``.hydra/``
files, logging), data preparation (``FineTuneDataModule``), model load (``load_model``),
base-model scoring (``score_base*``), method apply, data encoding (``connect``), training steps
(``on_train_batch_start`` -> ``on_train_batch_end``: forward, backward, optimizer step),
validation, sample generations logged at each validation, the rest of ``Trainer.fit`` and the
final ``Trainer.validate`` (loaders, optimizer and checkpoint set-up), final scoring, saving, and the run record (``metrics.json``,
manifest). ``other`` is the job's wall time that none of these covers. Overhead is everything
but the training steps; it is printed per job in seconds and as a share of the job.

The sweep uses a fresh cache folder holding links to the model folders already converted in
``FTLAB_CACHE`` (no GGUF conversion is timed), so the first job scores the base and the others
may reuse it; ``--cold`` drops the links (the first job converts the model too).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl

PHASES = ("compose", "hydra_setup", "data_prepare", "model_load", "base_score", "method_apply", "data_encode",
          "train_steps", "validation", "samples", "trainer_other", "final_score", "save", "record", "other")


class Timings:
    """Seconds per phase per job. A timed call inside another is counted in its own phase only
    (exclusive times), so the phases of a job add up to its wall time."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, float]] = []
        self.launching = False  # the overrides are checked by composing them too, before any job
        self._children: list[float] = []  # per open timed call: seconds of the timed calls inside it

    def start_job(self) -> None:
        if self.launching:
            self.jobs.append(defaultdict(float))

    def add(self, phase: str, seconds: float) -> None:
        if self.jobs and self.launching:
            self.jobs[-1][phase] += seconds

    def call(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._children.append(0.0)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            self.add(phase, elapsed - self._children.pop())
            if self._children:
                self._children[-1] += elapsed


TIMES = Timings()


def timed(phase: str, fn: Callable[..., Any], before: Callable[[], None] | None = None) -> Callable[..., Any]:
    """``fn`` whose wall time (less that of timed calls inside it) is added to ``phase``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
        return TIMES.call(phase, fn, *args, **kwargs)

    return wrapper


class StepTimer(pl.Callback):
    """Training-step and validation time inside ``Trainer.fit`` (validation includes the
    sample generations of callbacks placed before this one)."""

    def __init__(self) -> None:
        self._step = self._val = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._step = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        TIMES.add("train_steps", time.perf_counter() - self._step)

    def on_validation_start(self, *args: Any) -> None:
        self._val = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, *args: Any) -> None:
        TIMES.add("validation", time.perf_counter() - self._val)

    on_sanity_check_start = on_validation_start  # type: ignore[assignment]
    on_sanity_check_end = on_validation_end  # type: ignore[assignment]


def instrument() -> None:
    """Wrap the functions each phase runs (module attributes, where their callers look them up)."""
    from hydra._internal import config_loader_impl
    from hydra.core.plugins import Plugins

    Plugins.instance()  # its plugin scan executes the launcher's module again: patch what it leaves
    from hydra._internal.core_plugins import basic_launcher

    import ftlab.build as build
    import ftlab.train as train
    from ftlab.data import datamodule
    from ftlab.data.datamodule import FineTuneDataModule
    from ftlab.evaluation.samples import GenerationSamples

    launch = basic_launcher.BasicLauncher.launch

    def launching(*args: Any, **kwargs: Any) -> Any:
        TIMES.launching = True
        try:
            return launch(*args, **kwargs)
        finally:
            TIMES.launching = False

    basic_launcher.BasicLauncher.launch = launching
    loader = config_loader_impl.ConfigLoaderImpl
    loader.load_sweep_config = timed("compose", loader.load_sweep_config, before=TIMES.start_job)
    basic_launcher.run_job = timed("job", basic_launcher.run_job)
    train.train = timed("task", train.train)
    datamodule.load_splits = timed("data_prepare", datamodule.load_splits)
    FineTuneDataModule.connect = timed("data_encode", FineTuneDataModule.connect)
    FineTuneDataModule.setup = timed("data_encode", FineTuneDataModule.setup)
    build.load_model = timed("model_load", build.load_model)
    for name in ("score_base", "score_base_preference", "score_base_reward"):
        setattr(build, name, timed("base_score", getattr(build, name)))
    original_load_base = build.load_base

    def load_base(*args: Any, **kwargs: Any) -> Any:
        method, model, tokenizer = original_load_base(*args, **kwargs)
        method.apply = timed("method_apply", method.apply)  # the instance's, whatever class defines it
        method.save = timed("save", method.save)
        return method, model, tokenizer

    build.load_base = load_base
    original_trainer = train._trainer
    train._trainer = lambda cfg, callbacks, loggers: original_trainer(cfg, [*callbacks, StepTimer()], loggers)
    pl.Trainer.fit = timed("fit", pl.Trainer.fit)
    pl.Trainer.validate = timed("final_validate", pl.Trainer.validate)
    GenerationSamples.on_validation_end = timed("samples", GenerationSamples.on_validation_end)
    train.final_scores = timed("final_score", train.final_scores)
    train.write_metrics = timed("record", train.write_metrics)
    train.write_manifest = timed("record", train.write_manifest)
    train.data_fingerprint = timed("record", train.data_fingerprint)


def phases(raw: dict[str, float]) -> dict[str, float]:
    """Exclusive wrapper times and hook intervals -> disjoint phases summing to the job's wall time."""
    out = {p: raw.get(p, 0.0) for p in PHASES}
    # hook intervals: validation (sanity check included) holds the sample generations
    out["validation"] = raw.get("validation", 0.0) - raw.get("samples", 0.0)
    trainer = raw.get("fit", 0.0) + raw.get("final_validate", 0.0)
    out["trainer_other"] = trainer - raw.get("train_steps", 0.0) - out["validation"]
    out["hydra_setup"] = raw.get("job", 0.0)
    out["other"] = raw.get("task", 0.0)  # ftlab's own work between the timed calls
    out["total"] = sum(out[p] for p in PHASES)
    out["overhead"] = out["total"] - out["train_steps"]
    return out


def link_models(cache: Path, source: Path) -> None:
    """Give the fresh cache the converted model folders (not the scores) of ``source``."""
    for entry in source.iterdir() if source.is_dir() else []:
        if entry.is_dir() and entry.name not in ("base_eval", "base_reward", "base_preference", "tokenized"):
            (cache / entry.name).symlink_to(entry.resolve(), target_is_directory=True)


def run_sweep(model: str, methods: str, max_steps: int, num_prompts: int, root: Path, cold: bool,
              extra: list[str]) -> list[dict[str, float]]:
    """Run one sweep in this process; return each job's phases."""
    from ftlab.cli import train

    cache = root / f"cache-{model}"
    cache.mkdir(parents=True)
    if not cold:
        link_models(cache, Path(os.environ.get("FTLAB_CACHE", Path.home() / ".cache" / "ftlab")))
    first = len(TIMES.jobs)
    argv = sys.argv
    try:
        train(["-m", f"method={methods}", f"model={model}", f"trainer.max_steps={max_steps}",
               f"eval.num_prompts={num_prompts}", f"paths.cache_dir={cache}", f"hydra.sweep.dir={root / model}", *extra])
    finally:
        sys.argv = argv
    return [phases(raw) for raw in TIMES.jobs[first:]]


def table(model: str, methods: list[str], jobs: list[dict[str, float]]) -> str:
    """Per-job seconds per phase, overhead and its share of the job."""
    shown = [p for p in PHASES if any(j[p] >= 0.005 for j in jobs)]
    head = ["job", "total", "train_steps", "overhead", "share", *[p for p in shown if p != "train_steps"]]
    lines = [f"model={model}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, j in zip(methods, jobs):
        cells = [name, f"{j['total']:.2f}", f"{j['train_steps']:.2f}", f"{j['overhead']:.2f}",
                 f"{100 * j['overhead'] / max(j['total'], 1e-9):.0f}%", *[f"{j[p]:.2f}" for p in shown if p != "train_steps"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--models", nargs="+", default=["llama", "tiny"])
    parser.add_argument("--methods", default="lora,ia3,loha,lokr")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--cold", action="store_true", help="no model folders from FTLAB_CACHE: the first job converts")
    parser.add_argument("overrides", nargs="*", help="more ftlab overrides, e.g. trainer.limit_val_batches=2")
    args = parser.parse_args()
    instrument()
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="ftlab-sweep-overhead-") as tmp:
        reports = [table(m, methods, run_sweep(m, args.methods, args.max_steps, args.num_prompts, Path(tmp), args.cold,
                                             args.overrides))
                   for m in args.models]
    print("\nseconds per job; overhead = total - train_steps; share = overhead / total")
    print("\n\n".join(reports))


if __name__ == "__main__":
    main()
