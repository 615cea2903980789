"""Every option of every config group composes; method defaults reach other groups; bad combos fail early."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ftlab.config import CONF_DIR, compose
from ftlab.errors import ConfigError
from ftlab.registry import get_registry

GROUPS = ["model", "data", "optimizer", "scheduler", "quantization", "trainer", "logger", "callbacks", "paths",
          "experiment", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group: str, option: str, cache_dir) -> None:
    overrides = [f"{group}={option}"]
    if group == "quantization" and option != "none":
        overrides.append("method=qlora")
    if group == "model" and option not in ("tiny", "llama"):  # a family preset names a hub id: use a local twin
        from ftlab.models.tiny import TINY_DEFAULTS, tiny_checkpoint

        family = OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml").family
        folder = tiny_checkpoint(OmegaConf.create({"kind": "tiny", "family": family, **TINY_DEFAULTS}), cache_dir)
        overrides += [f"model.name_or_path={folder}", f"paths.cache_dir={cache_dir}"]
    cfg = compose(overrides)
    if group not in ("experiment", "debug"):
        assert OmegaConf.to_container(cfg[group], resolve=False) is not None
    OmegaConf.resolve(cfg.method)  # interpolations inside the method node resolve


@pytest.mark.parametrize("method", sorted(get_registry().methods))
def test_every_method_composes_and_names_itself(method: str) -> None:
    cfg = compose([f"method={method}"])
    assert cfg.method.name == method
    assert cfg.optimizer.lr == cfg.method.lr


def test_group_options_exist() -> None:
    assert {"none", "nf4", "fp4", "int8"} <= set(_options("quantization"))
    assert {"adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"} <= set(_options("optimizer"))
    assert {"csv", "tensorboard", "wandb"} <= set(_options("logger"))
    assert {"tiny", "llama"} <= set(_options("model"))


def test_qlora_selects_nf4_and_paged_adamw_through_its_defaults() -> None:
    cfg = compose(["method=qlora"])
    assert cfg.quantization.name == "nf4"
    assert cfg.quantization.bnb_4bit_use_double_quant is True
    assert cfg.optimizer._target_ == "bitsandbytes.optim.PagedAdamW8bit"


def test_command_line_beats_method_defaults() -> None:
    cfg = compose(["method=qlora", "quantization=fp4", "optimizer=adamw"])
    assert cfg.quantization.name == "fp4"
    assert cfg.optimizer._target_ == "torch.optim.AdamW"


def test_lora_on_nf4_spelled_out_equals_qlora_quantization() -> None:
    spelled = compose(["method=lora", "quantization=nf4"])
    assert spelled.quantization == compose(["method=qlora"]).quantization


def test_method_field_override_is_typed() -> None:
    assert compose(["method=lora", "method.r=8"]).method.r == 8
    with pytest.raises(Exception, match="method.r"):
        compose(["method=lora", "method.r=eight"])


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["method=full", "quantization=nf4"], "method 'full' cannot train on a quantization=nf4 base; it accepts quantization=none"),
        (["method=freeze", "quantization=int8"], "method 'freeze' cannot train on a quantization=int8 base"),
        (["method=qlora", "quantization=none"], "use method=lora for an unquantized base"),
    ],
)
def test_method_rejects_quantized_base_at_compose_time(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        compose(overrides)


def test_sweep_presets_set_the_sweeper() -> None:
    optuna = compose(["+sweep=optuna", "method=lora"], return_hydra_config=True)
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert optuna.hydra.sweeper.direction == "minimize"
    assert "method.lr" in optuna.hydra.sweeper.params
    grid = compose(["+sweep=grid", "method=lora"], return_hydra_config=True)
    assert grid.hydra.sweeper.params["method.r"] == "4,16,64"


@pytest.mark.parametrize("experiment,swept", [("lora_qlora_full", "full,lora,qlora"),
                                              ("freeze_vs_finetune", "freeze,lora,full")])
def test_comparison_experiments_sweep_methods_over_seeds(experiment: str, swept: str) -> None:
    cfg = compose([f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.method == swept
    assert cfg.hydra.sweeper.params.seed == "0,1,2"


def test_joblib_launcher_is_selectable() -> None:
    cfg = compose(["hydra/launcher=joblib"], return_hydra_config=True)
    assert "Joblib" in cfg.hydra.launcher._target_
