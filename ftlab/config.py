"""Where the shipped configs live, and config composition outside the command line (tests, tools)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from omegaconf import DictConfig

if TYPE_CHECKING:
    from ftlab.registry import MethodInfo

CONF_DIR = Path(__file__).parent / "conf"
CONFIG_NAME = "train"


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose the training config exactly as ``python -m ftlab`` would, for tests and tools.
    Works inside a running Hydra job too (a PPO run loading its reward model's run config): the
    job's Hydra state is set aside for the composition and put back after it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ftlab.registry import check_overrides, get_registry

    get_registry()
    check_overrides(overrides, default_method=default_method())
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    outer_job = HydraConfig.instance().cfg
    if outer is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
        HydraConfig.instance().cfg = outer_job
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


def strategy_of(cfg: DictConfig) -> tuple[str, str]:
    """The ``trainer.strategy`` of a composed config as a name (what a method's
    ``refused_strategies`` is matched against) and as it is shown in an error.

    A name is kept as written (``ddp_spawn``); a ``_target_`` node is named by its class,
    lowercased, without ``Strategy`` (``DDPStrategy`` -> ``ddp``); ``auto`` is ``ddp``, as
    Lightning resolves it, when ``trainer.num_nodes`` > 1 or ``trainer.devices`` names more than
    one device (``2``, ``[0, 1]``, ``"0,1"``); otherwise (one device, or ``-1``/``auto``, whose
    count only the machine knows) it stays ``auto``."""
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
        name = (target.removesuffix("Strategy") or target).lower()
        return name, f"{name} ({target})"
    name = str(strategy)
    if name == "auto":
        devices, nodes = _device_count(trainer.get("devices", 1)), trainer.get("num_nodes", 1)
        nodes = nodes if isinstance(nodes, int) and nodes > 1 else 1
        if devices > 1 or nodes > 1:
            return "ddp", f"auto (ddp over {devices} device(s) x {nodes} node(s))"
    return name, name


def _device_count(devices: Any) -> int:
    """How many devices ``trainer.devices`` names; 1 when only the machine knows (-1, ``auto``)."""
    if isinstance(devices, int):
        return max(devices, 1)
    if isinstance(devices, str):
        indices = [d for d in devices.split(",") if d.strip()]
        if "," in devices:  # "0,1": device indices ("0," is device 0 alone)
            return len(indices)
        return int(devices) if devices.strip().isdigit() else 1
    try:
        return len(devices)  # a list of device indices
    except TypeError:
        return 1


def refused_strategy(refused: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """The entry of a method's ``refused_strategies`` that refuses strategy ``name``: a key equal
    to it or a prefix of it followed by ``_`` (``ddp`` refuses ``ddp_spawn``, not ``deepspeed``)."""
    for key, reason in refused.items():
        if name == key or name.startswith(f"{key}_"):
            return key, str(reason)
    return None


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
    strategy, shown = strategy_of(cfg)
    refused = refused_strategy(info.cls.refused_strategies, strategy)
    if refused is not None:
        raise ConfigError(f"method '{info.name}' cannot train with trainer.strategy={shown}: {' '.join(refused[1].split())}")
    info.cls.check_config(cfg)
    return info
