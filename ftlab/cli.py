"""Command line: ``ftlab [train] OVERRIDES`` (also ``python -m ftlab``) and the subcommands of
``COMMANDS``, the one list of them: ``main`` dispatches through it, and the ``Usage:`` lines of
``ftlab --help`` are made from it (``hydra/default.yaml`` takes them with ``${ftlab.usage:}``).

Training goes through Hydra's own entry point, so every Hydra flag (``-m``, ``--cfg job``,
``hydra.run.dir=...``, ``--help``) behaves as Hydra users expect.

Every expected failure is an ``FtlabError`` (``ftlab.errors``); ``main`` reports it as one line,
``ftlab: error: <message>``, and exit status 1, whichever command raised it.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from ftlab.config import default_method
from ftlab.errors import FtlabError
from ftlab.known_warnings import show_known, verbose_requested

SWEEP_ROOT = Path("outputs/multirun")  # where hydra/default.yaml puts sweeps
RUN_ROOT = Path("outputs/runs")  # and single runs


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    from ftlab.train import task

    return task(cfg)


def _overrides(args: Sequence[str]) -> list[str]:
    """The overrides of a Hydra command line: KEY=VALUE and ~KEY (flags and their values are skipped)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-dir", "-cd",
                     "--config-path", "-cp", "--info", "--experimental-rerun"):
            skip = arg not in ("--info",)
        elif ("=" in arg and not arg.startswith("-")) or arg.startswith("~"):
            out.append(arg)
    return out


# flags after which Hydra runs no job (help, --cfg, --info, completion), or composes from configs
# other than ftlab's (--config-dir/-name/-path): the command line is not checked before Hydra then
_UNCHECKED = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
              "--config-name", "-cn", "--config-dir", "-cd", "--config-path", "-cp", "--experimental-rerun")


def train(args: Sequence[str]) -> None:
    """``ftlab [train] OVERRIDES``: check the overrides, then hand the command line to Hydra.

    Every check ``ftlab.config.compose`` makes (each key exists, each value fits its field's type
    and range, the model folder loads, the method accepts the rest) runs here, on every value of
    every sweep of a multirun, before Hydra makes a run folder and before any data or model loads."""
    from ftlab.config import check_overrides

    overrides = _overrides(args)
    if any(a.split("=", 1)[0] in _UNCHECKED for a in args):
        from ftlab.registry import check_overrides as check_method_overrides
        from ftlab.registry import get_registry

        get_registry()
        check_method_overrides(overrides, default_method=default_method())
    else:
        check_overrides(overrides, multirun=any(a in ("-m", "--multirun") for a in args))
    sys.argv = [sys.argv[0], *args, *_resume_sweep_dir(args)]
    hydra_main()


def _resume_sweep_dir(args: Sequence[str]) -> list[str]:
    """``resume=true`` continues the newest run (or, with ``-m``, sweep) folder made by the same
    overrides, so completed jobs are skipped and the others continue from their checkpoints (an
    explicit ``hydra.run.dir=`` / ``hydra.sweep.dir=`` is used as given)."""
    from ftlab.errors import FolderBusyError
    from ftlab.locks import is_held

    overrides = _overrides(args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    given = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    if "resume=true" not in overrides or any(o.startswith(given) for o in overrides):
        return []
    # Hydra keeps hydra/launcher=..., hydra.launcher.*=... out of a sweep's task overrides
    wanted = sorted(o for o in overrides if not o.startswith("resume=") and not _is_hydra_override(o))
    if multirun:
        found = [(c.parent, OmegaConf.load(c).hydra.overrides.task) for c in sorted(SWEEP_ROOT.glob("*/multirun.yaml"), reverse=True)]
    else:
        found = [(c.parent.parent, OmegaConf.load(c)) for c in sorted(RUN_ROOT.glob("*/.hydra/overrides.yaml"), reverse=True)]
    what = "sweep" if multirun else "run"
    for folder, task in found:
        if sorted(o for o in task if not o.startswith("resume=")) == wanted:
            if is_held(folder):
                raise FolderBusyError(f"{folder}: another ftlab process is still training this {what}; "
                                      "wait for it to end before resuming it")
            print(f"ftlab: resuming the {what} in {folder}", file=sys.stderr)
            return [f"{given}{folder}"]
    print(f"ftlab: resume=true but no earlier {what} ran these overrides; starting a new {what}", file=sys.stderr)
    return []


def _is_hydra_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def methods(args: Sequence[str]) -> None:
    """``ftlab methods [--sizes [OVERRIDES ...] [--out FILE]]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="ftlab methods", description=COMMANDS["methods"].help)
    parser.add_argument("--sizes", action="store_true",
                        help="apply and save every method on the model the overrides pick (default model=llama); "
                             "print trainable parameters and saved size as a markdown table")
    parser.add_argument("--out", type=Path, default=None, help="also write the --sizes table to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides for --sizes, e.g. model=tiny")
    ns = parser.parse_intermixed_args(list(args))
    if not ns.sizes:
        if ns.overrides or ns.out:
            parser.error("overrides and --out go with --sizes")
        from ftlab.methods.table import print_methods

        print_methods()
        return
    from ftlab.methods.sizes import sizes_table
    from ftlab.tables import print_markdown

    overrides = ns.overrides if any(o.startswith("model=") for o in ns.overrides) else ["model=llama", *ns.overrides]
    table = sizes_table(overrides)
    print_markdown(table)
    if ns.out:
        ns.out.write_text(table)


def compare(args: Sequence[str]) -> None:
    """``ftlab compare SWEEP_DIR [...] [--out DIR]``: rebuild the comparison from finished runs."""
    import argparse

    from ftlab.sweeps.compare import write_comparison
    from ftlab.tables import print_markdown

    parser = argparse.ArgumentParser(prog="ftlab compare", description=COMMANDS["compare"].help)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="sweep (or run) folders")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the first folder)")
    ns = parser.parse_args(list(args))
    try:
        table = write_comparison(ns.sweep_dirs, ns.out or ns.sweep_dirs[0])
    except FileNotFoundError as exc:
        raise SystemExit(f"ftlab: error: {exc}") from None
    print_markdown(table)


def evaluate(args: Sequence[str]) -> None:
    """``ftlab eval RUN_DIR [OVERRIDES]``: validation loss and scores of a finished run's model."""
    import argparse

    from ftlab.evaluation.evaluate import evaluate_run, summary_lines
    from ftlab.tables import print_markdown

    parser = argparse.ArgumentParser(prog="ftlab eval", description=COMMANDS["eval"].help)
    parser.add_argument("run_dir", type=Path, help="a run folder (outputs/runs/... or a sweep job's folder)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.path=test.jsonl eval.num_prompts=200")
    ns = parser.parse_args(list(args))
    result = evaluate_run(ns.run_dir, ns.overrides)
    print_markdown("\n".join(summary_lines(result)) + "\n")


def export(args: Sequence[str]) -> None:
    """``ftlab export RUN_DIR --out DIR [--merge] [--dtype D] [--force] [--gguf]``."""
    import argparse

    from ftlab.deploy.export import DTYPES, export_run

    parser = argparse.ArgumentParser(prog="ftlab export", description=COMMANDS["export"].help)
    parser.add_argument("run_dir", type=Path, help="a finished run folder")
    parser.add_argument("--out", type=Path, required=True, help="the export folder (new or empty)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the adapter into the base weights and write a full model (QLoRA: into a dequantized base)")
    parser.add_argument("--dtype", default=None, help=f"dtype of full model weights: {' | '.join(DTYPES)} (default: as merged)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    parser.add_argument("--gguf", action="store_true", help="also write model.gguf for llama.cpp (Llama models, with --merge)")
    ns = parser.parse_args(list(args))
    result = export_run(ns.run_dir, ns.out, merge=ns.merge, dtype=ns.dtype, force=ns.force, gguf=ns.gguf)
    what = "PEFT adapter" if result.format == "peft-adapter" else ("merged model" if result.merged else "model")
    print(f"exported {what} to {result.out} (base: {result.base_model})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"model card: {result.out / 'README.md'}")


def talk(command: str, args: Sequence[str]) -> None:
    """``ftlab generate PATH PROMPT [...]`` and ``ftlab chat PATH [...]``."""
    import argparse

    from ftlab.deploy.chat import DEFAULT_MAX_NEW_TOKENS, chat_loop, check_settings, generate_once, load_chatbot

    parser = argparse.ArgumentParser(prog=f"ftlab {command}", description=COMMANDS[command].help)
    parser.add_argument("path", type=Path, help="a run folder or an export folder")
    if command == "generate":
        parser.add_argument("prompt", help="the user message to answer")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="longest answer in tokens")
    parser.add_argument("--system", default=None, help="a system message put before the conversation")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) answers greedily; above 0 samples")
    ns = parser.parse_args(list(args))
    try:
        if command == "generate":
            generate_once(ns.path, ns.prompt, ns.system, ns.max_new_tokens, ns.temperature)
        else:
            check_settings(ns.max_new_tokens, ns.temperature)
            chat_loop(load_chatbot(ns.path), ns.system, ns.max_new_tokens, ns.temperature)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def rerun(args: Sequence[str]) -> None:
    """``ftlab rerun RUN_DIR [OVERRIDES]``: the run again, from its ``manifest.json``, in a new folder."""
    import argparse

    from ftlab.deploy.rerun import rerun_run

    parser = argparse.ArgumentParser(prog="ftlab rerun", description=COMMANDS["rerun"].help)
    parser.add_argument("run_dir", type=Path, help="a run folder (or a sweep job's folder) holding manifest.json")
    parser.add_argument("overrides", nargs="*", help="overrides added to the run's own, e.g. trainer.max_steps=10")
    ns = parser.parse_args(list(args))
    rerun_run(ns.run_dir, ns.overrides, train)


class Command(NamedTuple):
    run: Callable[[Sequence[str]], None]  # called with the arguments after the command's name
    help: str  # the description of ``ftlab NAME --help``
    usage: tuple[tuple[str, str], ...]  # its lines in ``ftlab --help``: (command line, what it does)


COMMANDS: dict[str, Command] = {
    "train": Command(train, "train with Hydra overrides (the default when no subcommand is given)", (
        ("python -m ftlab [GROUP=OPTION ...] [KEY=VALUE ...]", "or: ftlab train ..."),
        ("python -m ftlab -m method=full,lora,qlora seed=0,1", "a sweep, one job each"),
        ("python -m ftlab -v ...", "also show the third-party warnings ftlab filters"))),
    "rerun": Command(rerun, "repeat a run from its manifest.json in a new folder: ftlab rerun RUN_DIR [OVERRIDES]", (
        ("ftlab rerun RUN_DIR [OVERRIDES]", "the same run again, naming what differs on this machine"),)),
    "methods": Command(methods, "list installed methods and presets; --sizes [OVERRIDES] measures each on a model", (
        ("ftlab methods", "installed methods and their fields"),)),
    "compare": Command(compare, "compare finished runs: ftlab compare SWEEP_DIR [SWEEP_DIR ...] [--out DIR]", (
        ("ftlab compare SWEEP_DIR [...]", "comparison table and plot of finished runs"),)),
    "eval": Command(evaluate, "evaluate a finished run again: ftlab eval RUN_DIR [OVERRIDES, e.g. data.path=other.jsonl]", (
        ("ftlab eval RUN_DIR [OVERRIDES]", "evaluate a finished run again"),)),
    "export": Command(export, "export a run for plain transformers/peft: ftlab export RUN_DIR --out DIR [--merge] "
                              "[--dtype D] [--gguf]", (
        ("ftlab export RUN_DIR --out DIR [--merge]", "adapter or merged model for plain transformers/peft"),)),
    "generate": Command(partial(talk, "generate"), "answer one prompt: ftlab generate RUN_DIR_OR_EXPORT \"PROMPT\" "
                                                  "[--max-new-tokens N] [--system TEXT]", (
        ("ftlab generate RUN_DIR_OR_EXPORT \"PROMPT\"", "one streamed answer"),)),
    "chat": Command(partial(talk, "chat"), "talk with a run's model or an export: ftlab chat RUN_DIR_OR_EXPORT "
                                          "(/reset, /exit)", (
        ("ftlab chat RUN_DIR_OR_EXPORT", "an interactive conversation"),)),
}


def usage() -> str:
    """The ``Usage:`` lines of ``ftlab --help``, one or more per command of ``COMMANDS``."""
    lines = [f"{line:<55} ({what})" for command in COMMANDS.values() for line, what in command.usage]
    return "Usage: " + "\n       ".join(lines)


# hydra/default.yaml's help header reads ${ftlab.usage:}; Hydra resolves it when it prints --help
OmegaConf.register_new_resolver("ftlab.usage", usage, replace=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``ftlab COMMAND ARGS`` (``train`` when the first argument names no command)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if verbose_requested(args):  # the third-party warnings ftlab filters (ftlab.known_warnings) are shown
        show_known()
        args = [a for a in args if a not in ("-v", "--verbose")]
    name = args[0] if args and args[0] in COMMANDS else "train"
    try:
        COMMANDS[name].run(args[1:] if args[:1] == [name] else args)
    except FtlabError as exc:
        raise SystemExit(f"ftlab: error: {exc}") from None


if __name__ == "__main__":
    main()
