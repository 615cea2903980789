"""Command line: ``ftlab [train] OVERRIDES`` (also ``python -m ftlab``), ``ftlab methods``, ``ftlab compare``.

Training goes through Hydra's own entry point, so every Hydra flag (``-m``, ``--cfg job``,
``hydra.run.dir=...``, ``--help``) behaves as Hydra users expect.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from ftlab.config import default_method
from ftlab.errors import FtlabError

SUBCOMMANDS = {
    "train": "train with Hydra overrides (the default when no subcommand is given)",
    "methods": "list installed methods and presets; --sizes [OVERRIDES] measures each on a model",
    "compare": "compare finished runs: ftlab compare SWEEP_DIR [SWEEP_DIR ...] [--out DIR]",
    "eval": "evaluate a finished run again: ftlab eval RUN_DIR [OVERRIDES, e.g. data.path=other.jsonl]",
}
SWEEP_ROOT = Path("outputs/multirun")  # where hydra/default.yaml puts sweeps


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    from ftlab.train import task

    return task(cfg)


def _overrides(args: Sequence[str]) -> list[str]:
    """The KEY=VALUE arguments of a Hydra command line (flags and their values are skipped)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
                     "--config-path", "-cp", "--info", "--experimental-rerun"):
            skip = arg not in ("--info",)
        elif "=" in arg and not arg.startswith("-"):
            out.append(arg)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["methods"]:
        methods(args[1:])
        return
    if args[:1] == ["compare"]:
        compare(args[1:])
        return
    if args[:1] == ["eval"]:
        evaluate(args[1:])
        return
    if args[:1] == ["train"]:
        args = args[1:]
    from ftlab.registry import check_overrides, get_registry

    try:
        get_registry()
        check_overrides(_overrides(args), default_method=default_method())
    except FtlabError as exc:
        raise SystemExit(f"ftlab: error: {exc}") from None
    args += _resume_sweep_dir(args)
    sys.argv = [sys.argv[0], *args]
    hydra_main()


def _resume_sweep_dir(args: Sequence[str]) -> list[str]:
    """``-m ... resume=true`` re-runs into the newest sweep folder made by the same command, so
    completed jobs are found and skipped (an explicit ``hydra.sweep.dir=`` is used as given)."""
    overrides = _overrides(args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    if not multirun or "resume=true" not in overrides or any(o.startswith("hydra.sweep.dir=") for o in overrides):
        return []
    wanted = sorted(o for o in overrides if not o.startswith("resume="))
    for config in sorted(SWEEP_ROOT.glob("*/multirun.yaml"), reverse=True):
        task = OmegaConf.load(config).hydra.overrides.task
        if sorted(o for o in task if not o.startswith("resume=")) == wanted:
            print(f"ftlab: resuming the sweep in {config.parent}", file=sys.stderr)
            return [f"hydra.sweep.dir={config.parent}"]
    print("ftlab: resume=true but no earlier sweep ran these overrides; starting a new sweep", file=sys.stderr)
    return []


def methods(args: Sequence[str]) -> None:
    """``ftlab methods [--sizes [OVERRIDES ...] [--out FILE]]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="ftlab methods", description=SUBCOMMANDS["methods"])
    parser.add_argument("--sizes", action="store_true",
                        help="apply and save every method on the model the overrides pick (default model=llama); "
                             "print trainable parameters and saved size as a markdown table")
    parser.add_argument("--out", type=Path, default=None, help="also write the --sizes table to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides for --sizes, e.g. model=tiny")
    ns = parser.parse_intermixed_args(list(args))
    if not ns.sizes:
        if ns.overrides or ns.out:
            parser.error("overrides and --out go with --sizes")
        from ftlab.methods_table import print_methods

        print_methods()
        return
    from ftlab.method_sizes import sizes_table

    overrides = ns.overrides if any(o.startswith("model=") for o in ns.overrides) else ["model=llama", *ns.overrides]
    try:
        table = sizes_table(overrides)
    except FtlabError as exc:
        raise SystemExit(f"ftlab: error: {exc}") from None
    print(table, end="")
    if ns.out:
        ns.out.write_text(table)


def compare(args: Sequence[str]) -> None:
    """``ftlab compare SWEEP_DIR [...] [--out DIR]``: rebuild the comparison from finished runs."""
    import argparse

    from rich.console import Console
    from rich.markdown import Markdown

    from ftlab.compare import write_comparison

    parser = argparse.ArgumentParser(prog="ftlab compare", description=SUBCOMMANDS["compare"])
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep (or run) folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first folder)")
    ns = parser.parse_args(list(args))
    try:
        table = write_comparison(ns.sweep_dirs, ns.out or ns.sweep_dirs[0])
    except FileNotFoundError as exc:
        raise SystemExit(f"ftlab: error: {exc}") from None
    Console().print(Markdown(table))


def evaluate(args: Sequence[str]) -> None:
    """``ftlab eval RUN_DIR [OVERRIDES]``: validation loss and scores of a finished run's model."""
    import argparse

    from ftlab.evaluate import evaluate_run, summary_lines

    parser = argparse.ArgumentParser(prog="ftlab eval", description=SUBCOMMANDS["eval"])
    parser.add_argument("run_dir", type=Path, help="a run folder (outputs/runs/... or a sweep job's folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=test.jsonl eval.num_prompts=200")
    ns = parser.parse_args(list(args))
    try:
        result = evaluate_run(ns.run_dir, ns.overrides)
    except FtlabError as exc:
        raise SystemExit(f"ftlab: error: {exc}") from None
    print("\n".join(summary_lines(result)))


if __name__ == "__main__":
    main()
