"""Where the shipped configs live, and config composition outside the command line (tests, tools)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from omegaconf import DictConfig

from ftlab.errors import ConfigError

if TYPE_CHECKING:
    from ftlab.errors import FtlabError
    from ftlab.registry import MethodInfo

CONF_DIR = Path(__file__).parent / "conf"
CONFIG_NAME = "train"


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """Compose the training config exactly as ``python -m ftlab`` would, for tests and tools, and
    check it (``validate``): a bad override or value is a one-line ``FtlabError``, never Hydra's
    or OmegaConf's traceback. Works inside a running Hydra job too (a PPO run loading its reward
    model's run config): the job's Hydra state is set aside for the composition and put back."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ftlab.overrides import check
    from ftlab.registry import check_overrides, get_registry

    parsed = check(overrides)  # what needs no composition: keys, group options, values
    get_registry()
    check_overrides(overrides, default_method=default_method())  # method names, fields and values
    for o in parsed:
        if o.is_sweep_override():
            raise ConfigError(f"{o.input_line}: a sweep runs with -m (--multirun); for a list write "
                              f"{o.get_key_element()}=[...], for a string quote the value")
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    outer_job = HydraConfig.instance().cfg
    if outer is not None:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            try:
                cfg = hydra_compose(CONFIG_NAME, overrides=list(overrides), return_hydra_config=return_hydra_config)
            except Exception as exc:
                error = _composition_error(exc, parsed)
                if error is None:
                    raise
                raise error from None
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
        HydraConfig.instance().cfg = outer_job
    validate(cfg)
    return cfg


def check_overrides(overrides: Sequence[str], multirun: bool = False) -> None:
    """Every check ``compose`` makes, for a command line about to run (``ftlab.cli.train`` calls
    it before Hydra makes a run folder): a multirun composes once per value of every sweep (the
    command line's and the sweeps its config files declare, ``hydra.sweeper.params``), each value
    with the first of the other sweeps, and validates each composition."""
    from ftlab.overrides import check, variations

    check(overrides)  # the quick checks first: a typo fails before the method registry (torch) loads
    if not multirun:
        compose(overrides)
        return
    from ftlab.errors import FtlabError
    from ftlab.registry import check_overrides as check_method_overrides
    from ftlab.registry import get_registry

    get_registry()
    check_method_overrides(overrides, default_method=default_method())  # every swept method and value
    base = variations(overrides)[0]
    params = compose(base, return_hydra_config=True).hydra.sweeper.get("params")
    declared = []
    for key, value in (params or {}).items():
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            declared.append(f"{key}={value}")
    try:
        runs = variations(overrides, declared)
    except FtlabError:  # a sweeper's own syntax that Hydra's parser does not take: its sweeper's job
        runs = variations(overrides)
    for run in runs:
        if run != base:
            compose(run)


def _composition_error(exc: Exception, parsed: Sequence[Any]) -> "FtlabError | None":
    """Hydra's and OmegaConf's composition errors as one line naming the key and what is valid;
    None for anything else (a bug, which keeps its traceback)."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    from ftlab.schema import shown, spec_at, unknown_key_message

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        options = ", ".join(exc.options or [])
        return ConfigError(f"{group}={option}: no such option of the {group} group; options: {options}")
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for error in chain:
        key = getattr(error, "full_key", None)
        if not key:
            continue
        written = next((o for o in parsed if o.key_or_group == key), None)
        if isinstance(error, ValidationError):
            value = shown(written.value()) if written is not None else "?"
            spec = spec_at(key, _method_config(key, parsed))
            expected = spec.expected() if spec else " ".join(str(error).split("full_key:")[0].split())
            return ConfigError(f"{key}={value}: expected {expected}")
        if isinstance(error, (ConfigKeyError, AttributeError)):
            return ConfigError(unknown_key_message(key, _keys_of(key.rpartition(".")[0], parsed)))
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return ConfigError(" ".join(str(exc).split()))
    return None


def _method_config(key: str, parsed: Sequence[Any]) -> type | None:
    """The ``Config`` of the method the overrides select, for a ``method.*`` key (else None)."""
    from ftlab.errors import FtlabError
    from ftlab.registry import get_registry

    if not key.startswith("method."):
        return None
    name = next((str(o.value()) for o in parsed if o.key_or_group == "method" and not o.is_sweep_override()),
                default_method())
    try:
        return get_registry().get(name).cls.Config
    except FtlabError:
        return None


def _keys_of(parent: str, parsed: Sequence[Any]) -> list[str]:
    """The keys of node ``parent`` in the config the group choices among ``parsed`` compose."""
    from hydra import compose as hydra_compose
    from omegaconf import OmegaConf

    from ftlab.overrides import inventory

    groups = inventory().groups
    choices = [o.input_line for o in parsed if not o.is_sweep_override()
               and (o.key_or_group in groups or o.key_or_group == "method" or "/" in o.key_or_group)]
    try:
        cfg = hydra_compose(CONFIG_NAME, overrides=choices, return_hydra_config=parent.split(".")[0] == "hydra")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(str(k) for k in node.keys())
    except Exception:
        return []


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
    """Checks that need the whole composed config; run before anything heavy is loaded: every
    field's type and range, the model folder, then what the method accepts."""
    from ftlab.models.files import check_model_config
    from ftlab.registry import get_registry
    from ftlab.schema import check_config

    info = get_registry().get(cfg.method.name)
    check_config(cfg, info.cls.Config)  # the type and range of every field (ftlab.schema)
    if cfg.get("model") is not None:
        check_model_config(cfg.model)  # a local model folder that cannot load (headers only)
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
    from ftlab.strategies import check_method_saves_shards, check_strategy

    check_strategy(cfg)  # a quantized base that FSDP/ZeRO-3 sharding would corrupt
    check_method_saves_shards(cfg, info.cls, info.name)
    if cfg.get("model") is not None:
        check_architecture(cfg, info)
    info.cls.check_config(cfg)
    return info


def check_architecture(cfg: DictConfig, info: "MethodInfo") -> None:
    """What the model's architecture (read from its config, no weights) rules out: a quantization
    bitsandbytes cannot apply to its layers, a reward or classification head transformers has no
    sequence-classification class for, a method that cannot train it (``refuse_model``)."""
    from ftlab.models.architecture import architecture
    from ftlab.models.quant import unquantizable_layers

    paths = cfg.get("paths")
    arch = architecture(cfg.model, paths.cache_dir if paths is not None else ".")
    quant = str(cfg.quantization.name)
    if quant != "none":
        left = unquantizable_layers(arch.skeleton)
        if left:
            raise ConfigError(
                f"quantization={quant} cannot quantize {arch.describe()}: its decoder blocks' linear layers are "
                f"{', '.join(left)}, which bitsandbytes does not replace (transformers quantizes only nn.Linear "
                "and Conv1D); use quantization=none for this model"
            )
    reward, classifier = info.cls.head == "reward", task_of(cfg) == "classification"
    if reward or classifier:  # the base loads as AutoModelForSequenceClassification (a scalar or label head)
        from transformers import AutoModelForSequenceClassification

        remote = "AutoModelForSequenceClassification" in (getattr(arch.config, "auto_map", None) or {})
        if not (remote or type(arch.config) in AutoModelForSequenceClassification._model_mapping):
            who, need = (f"method '{info.name}'", "a reward model's scalar head") if reward else \
                ("task=classification", "a classification head")
            raise ConfigError(
                f"{who} cannot train {arch.describe()}: transformers has no sequence-classification class for "
                f"{arch.family or arch.model_type} ({type(arch.config).__name__}), which {need} needs; use a model "
                f"family that has one{'' if reward else ', or task=causal_lm'} (docs/models.md)"
            )
    reason = info.cls.refuse_model(arch, cfg)
    if reason:
        raise ConfigError(f"method '{info.name}' cannot train {arch.describe()}: {reason}")
