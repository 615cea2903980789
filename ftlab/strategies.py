"""Lightning's distributed strategies, with what only the model and the config can tell them.

The trainer presets (``trainer=ddp``, ``fsdp``, ``deepspeed_zero2``, ``deepspeed_zero3``) write
``trainer.strategy`` as a ``_target_`` node of Lightning's own strategy class; ftlab adds no
distributed layer of its own. Three things are filled in or checked here:

- ``build_strategy``: FSDP's ``auto_wrap_policy`` (and ``activation_checkpointing_policy``) written
  as ``decoder_layers`` become the model's decoder-layer class, read from the loaded model (the
  class of its repeated blocks), so one preset wraps Llama, GPT-2, Falcon or a plugin's model alike.
- ``check_strategy`` (when the config is checked) refuses in one line a quantized base that
  sharding would corrupt (4-bit weights packed as uint8 bytes among float weights; 8-bit
  weights) and ``check_method_saves_shards`` a method that could not save a sharded run;
  ``check_can_run`` (in the training process, before the model loads) FSDP and DeepSpeed without
  CUDA (Lightning runs them on GPUs only) and DeepSpeed not installed.
- ``gathered_state_dict``: after training under a sharded strategy every rank holds a shard;
  the full weights are gathered (a collective, on every rank) so rank 0 saves the usual HF-format
  adapter or model, which ``ftlab export`` and ``ftlab eval`` read as after any run.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Mapping

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from ftlab.config import refused_strategy, strategy_of
from ftlab.errors import ConfigError

DECODER_LAYERS = "decoder_layers"  # what a preset writes where FSDP needs the model's decoder-layer class
GPU_ONLY = {
    "fsdp": "Lightning runs FSDP on CUDA GPUs only (torch's FSDP needs an accelerator device)",
    "deepspeed": "Lightning runs DeepSpeed on CUDA GPUs only",
}
FLOAT_STORAGE = ("bfloat16", "float16", "float32")


def family(name: str) -> str | None:
    """``fsdp`` or ``deepspeed`` for a strategy name of either (``fsdp_cpu_offload``, ``deepspeed_stage_3``),
    matched as a method's ``refused_strategies`` are."""
    found = refused_strategy(GPU_ONLY, name)
    return found[0] if found is not None else None


def shards_weights(cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` splits the weights themselves across ranks (FSDP, ZeRO stage 3)."""
    name, _ = strategy_of(cfg)
    node = (cfg.get("trainer") or {}).get("strategy")
    if family(name) == "deepspeed":
        stage = node.get("stage") if isinstance(node, DictConfig) else (3 if name.endswith("3") or "stage_3" in name else 2)
        return int(stage or 2) == 3
    return family(name) == "fsdp" and not (isinstance(node, DictConfig)
                                           and str(node.get("sharding_strategy", "FULL_SHARD")) == "NO_SHARD")


def check_can_run(cfg: DictConfig) -> None:
    """Refuse, in the process about to train and before its model loads, a strategy this machine
    cannot run: FSDP or DeepSpeed without CUDA, DeepSpeed not installed. (Not part of ``validate``:
    a sweep is composed and checked on a login node without GPUs before SLURM runs it elsewhere.)"""
    name, shown = strategy_of(cfg)
    kind = family(name)
    if kind is None:
        return
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "cpu" or (accelerator in ("auto", "gpu", "cuda") and not torch.cuda.is_available()):
        where = "trainer.accelerator=cpu" if accelerator == "cpu" else "this machine has no CUDA GPU"
        raise ConfigError(f"trainer.strategy={shown} needs CUDA GPUs, and {where}: {GPU_ONLY[kind]}; "
                          "on CPUs, trainer=ddp trains with several processes")
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"trainer.strategy={shown} needs DeepSpeed, an optional extra: pip install 'ftlab[deepspeed]'")


def check_strategy(cfg: DictConfig) -> None:
    """Refuse, when the config is checked, a quantized base that the strategy's sharding would corrupt."""
    name, shown = strategy_of(cfg)
    if family(name) is None:
        return
    quant = cfg.get("quantization") or {}
    qname = str(quant.get("name", "none"))
    if qname == "none" or not shards_weights(cfg):
        return
    if qname == "int8":
        raise ConfigError(f"quantization=int8 with trainer.strategy={shown}: bitsandbytes' 8-bit weights cannot be "
                          "sharded (their scales live outside the weight tensor); use quantization=nf4 with "
                          "quantization.bnb_4bit_quant_storage set to model.dtype, or trainer=ddp")
    storage, dtype = str(quant.get("bnb_4bit_quant_storage", "uint8")), str(cfg.model.get("dtype", "float32"))
    if storage not in FLOAT_STORAGE or storage != dtype:
        raise ConfigError(
            f"quantization={qname} with trainer.strategy={shown} needs quantization.bnb_4bit_quant_storage={dtype} "
            f"(model.dtype), not {storage}: sharding flattens each wrapped layer's weights into one tensor of one "
            "dtype, and 4-bit weights packed as uint8 among float weights are sharded and gathered as the wrong "
            "numbers without an error; with a float storage dtype they are flattened like the others")


def check_method_saves_shards(cfg: DictConfig, method_cls: type, method_name: str) -> None:
    """A method whose ``save`` cannot take the gathered weights (``state_dict=``) would lose a
    sharded run's result after training: refused before it starts."""
    import inspect

    if not shards_weights(cfg):
        return
    parameters = inspect.signature(method_cls.save).parameters
    if "state_dict" not in parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        _, shown = strategy_of(cfg)
        raise ConfigError(f"method '{method_name}' cannot save a run of trainer.strategy={shown}: its save(model, "
                          "directory) takes no state_dict=, the whole weights gathered from the ranks' shards "
                          "(docs/plugins.md); use trainer=ddp or deepspeed_zero2")


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The class of the model's repeated transformer blocks (``LlamaDecoderLayer``, GPT-2's ``GPT2Block``)."""
    from ftlab.models.structure import decoder_blocks

    return {type(block) for block in decoder_blocks(model)}


def build_strategy(trainer_cfg: DictConfig, model: nn.Module) -> Any:
    """``trainer.strategy`` ready for ``pl.Trainer``: a name as written, a ``_target_`` node
    instantiated with ``decoder_layers`` replaced by the model's decoder-layer class."""
    node = trainer_cfg.get("strategy", "auto")
    if not isinstance(node, DictConfig):
        return node
    layers = {key: decoder_layer_classes(model) for key in ("auto_wrap_policy", "activation_checkpointing_policy")
              if node.get(key) == DECODER_LAYERS}
    return hydra.utils.instantiate(node, **layers)


def is_sharded(strategy: Any) -> bool:
    """Whether a running strategy holds only a shard of each weight on a rank."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and bool(strategy.zero_stage_3)


def writes_through_checkpoint_io(strategy: Any) -> bool:
    """Whether Lightning saves the strategy's checkpoints through a ``CheckpointIO`` plugin (FSDP
    and DeepSpeed write their own files, and refuse one)."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, str):
        return family(strategy) is None
    return not isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy))


def gathered_state_dict(trainer: Any, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of ``model`` (the module's ``model``) gathered from every rank: the state
    dict on rank 0, ``{}`` elsewhere; None when the strategy does not shard weights (the model's own
    ``state_dict`` is whole). Every rank must call it: gathering is a collective."""
    strategy = trainer.strategy
    if not is_sharded(strategy):
        return None
    from pytorch_lightning.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):  # a full state dict (Lightning's state_dict_type=full), on rank 0, on CPU
        state = strategy.lightning_module_state_dict()  # every rank takes part; rank 0 receives it
        return _inner(state, "model.") if trainer.is_global_zero else {}
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not trainer.is_global_zero:
            return {}
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _inner(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of the LightningModule's state dict that belong to its ``model``, named as
    ``model.state_dict()`` names them."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
