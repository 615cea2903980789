"""Command line: ``ftlab [train] OVERRIDES`` (also ``python -m ftlab``) and ``ftlab methods``.

Training goes through Hydra's own entry point, so every Hydra flag (``-m``, ``--cfg job``,
``hydra.run.dir=...``, ``--help``) behaves as Hydra users expect.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import hydra
from omegaconf import DictConfig

from ftlab.config import default_method
from ftlab.errors import FtlabError

SUBCOMMANDS = {
    "train": "train with Hydra overrides (the default when no subcommand is given)",
    "methods": "list installed fine-tuning methods, their package and their fields",
}


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
        from ftlab.methods_table import print_methods

        print_methods()
        return
    if args[:1] == ["train"]:
        args = args[1:]
    from ftlab.registry import check_overrides, get_registry

    try:
        get_registry()
        check_overrides(_overrides(args), default_method=default_method())
    except FtlabError as exc:
        raise SystemExit(f"ftlab: error: {exc}") from None
    sys.argv = [sys.argv[0], *args]
    hydra_main()


if __name__ == "__main__":
    main()
