"""Where the shipped configs live, and config composition outside the command line (tests, tools)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from omegaconf import DictConfig

if TYPE_CHECKING:
    from ftlab.registry import MethodInfo

CONF_DIR = Path(__file__).parent / "conf"
CONFIG_NAME = "train"


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose the training config exactly as ``python -m ftlab`` would, for tests and tools."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ftlab.registry import check_overrides, get_registry

    get_registry()
    check_overrides(overrides, default_method=default_method())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)
    validate(cfg)
    return cfg


def default_method() -> str:
    """The method the root defaults list selects when the command line names none."""
    from omegaconf import OmegaConf

    root = OmegaConf.load(CONF_DIR / f"{CONFIG_NAME}.yaml")
    for entry in root.get("defaults", []):
        if isinstance(entry, DictConfig) and "method" in entry:
            return str(entry["method"])
    return "lora"


def task_of(cfg: DictConfig) -> str:
    """The ``task=`` choice (``causal_lm`` for configs composed before the group existed)."""
    return str(cfg.task.name) if cfg.get("task") else "causal_lm"


def validate(cfg: DictConfig) -> "MethodInfo":
    """Checks that need the whole composed config; run before anything heavy is loaded."""
    from ftlab.errors import ConfigError
    from ftlab.registry import get_registry

    info = get_registry().get(cfg.method.name)
    quant = cfg.quantization.name
    if quant not in info.cls.quantizations:
        accepted = " | ".join(info.cls.quantizations)
        hint = " (use method=lora for an unquantized base)" if quant == "none" else ""
        raise ConfigError(
            f"method '{info.name}' cannot train on a quantization={quant} base; "
            f"it accepts quantization={accepted}{hint}"
        )
    if cfg.get("eval") is not None and cfg.eval.generate:
        from ftlab.evaluation.checkers import get_checker

        get_checker(str(cfg.eval.checker))  # a misspelt checker fails before any model loads
    task = task_of(cfg)
    if task not in info.cls.tasks:
        raise ConfigError(
            f"method '{info.name}' cannot train task={task}; it trains task={' | '.join(info.cls.tasks)}"
        )
    info.cls.check_config(cfg)
    return info
