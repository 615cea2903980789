"""The method plugin contract: a config dataclass plus a few hooks with sensible defaults.

A method turns a loaded base model into the model to train (``apply``). Everything else the
training module and the export path need from a method (which parameters to optimize and with
which learning rates, the loss, a per-step hook, what to save and how to load it back, how to
merge into plain weights, which quantized bases it accepts) has a default here, so most methods
override ``apply`` only. ``ftlab.testing`` checks every hook against a tiny model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ftlab.errors import MethodError
from ftlab.models.quant import QUANT_NAMES

__all__ = ["BaseMethod", "MethodConfig", "QUANTIZATIONS", "TASKS", "config_fields", "field_default", "field_help"]

QUANTIZATIONS = QUANT_NAMES  # every `quantization=` choice: what a method that keeps its base frozen accepts
TASKS = ("causal_lm", "classification")


@dataclass
class MethodConfig:
    """Base of every method's config node (stored in Hydra's ConfigStore under ``method``).

    ``name`` is filled in by the registry with the entry-point name, so a composed config always
    says which method it selected. ``lr`` lives here because good learning rates differ by
    method (full fine-tuning wants ~10x less than LoRA), so a sweep over methods stays fair.
    """

    name: str = "???"
    lr: float = field(default=2e-4, metadata={"help": "learning rate (the optimizer's lr follows it)"})


def config_fields(config_cls: type[MethodConfig]) -> list[dataclasses.Field]:
    """The user-settable fields of a method config (everything but ``name``)."""
    return [f for f in dataclasses.fields(config_cls) if f.name not in ("name", "defaults")]


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", ""))


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "???"


class BaseMethod:
    """Defaults for every hook; subclasses set ``Config`` and implement ``apply``.

    Class attributes:
        Config: the dataclass (subclass of MethodConfig) holding the method's settings.
        quantizations: the ``quantization=`` choices whose base this method can train.
        artifact: the name of the saved folder in the run directory ("model", "adapter").
        defaults: Hydra defaults-list entries the method selects in other groups, e.g.
            ``{"override /quantization@_global_.quantization": "nf4"}`` (the method's node sits
            under ``method``, so the group needs its global package spelt out); the command line
            still wins over them.
        trains_base: whether weights of the base model itself train (full, freeze); when False,
            the contract checks that every base weight stays frozen and unchanged.
        cannot_merge: why the trained model cannot be folded into plain base weights (prompt
            tuning adds virtual tokens, bottleneck adapters a non-linearity); empty if it can.
        no_packing: why the method's model cannot take packed batches (several examples in one
            sequence, told apart by position ids, with no attention mask); empty if it can.
        tasks: the ``task=`` choices the method can train: ``causal_lm`` (next-token prediction)
            and ``classification`` (a sequence-classification head the method must train too).
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    quantizations: ClassVar[tuple[str, ...]] = ("none",)
    defaults: ClassVar[list[Any]] = []
    artifact: ClassVar[str] = "model"  # run-folder name of what ``save`` writes
    trains_base: ClassVar[bool] = False
    cannot_merge: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = TASKS
    no_packing: ClassVar[str] = ""

    @property
    def packing(self) -> bool:
        return not self.no_packing

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse a composed run this method cannot train, before any model loads: raise a
        ConfigError naming the setting and what would work. ``quantizations`` and ``tasks`` are
        checked already; this is for combinations of fields (e.g. DoRA on an int8 base on a CPU)."""

    # -- building the model -------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """Inject adapters and/or freeze weights; return the model to train."""
        raise NotImplementedError

    # -- training -----------------------------------------------------------------------------
    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-group learning rates (e.g. LoRA+)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments of the model's forward for a batch; override to add inputs
        the method's model needs (multitask prompt tuning's ``task_ids``)."""
        return dict(batch)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training objective; the default is the causal LM loss over labelled tokens."""
        return model(**self.model_inputs(batch)).loss

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        """Called after every optimizer step (e.g. AdaLoRA's rank budget update): right after
        ``optimizer.step()``, before gradients are zeroed. In a training run ``global_step`` is
        Lightning's, the number of optimizer steps completed before this one (0 after the first)."""

    # -- saving, loading, merging ----------------------------------------------------------------
    def save(self, model: nn.Module, directory: Path) -> Path:
        """Save what this method trained in HF format (safetensors) and return the folder."""
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory, safe_serialization=True)
        return directory

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        """Rebuild the trained model from a freshly loaded ``base`` and what ``save`` wrote.

        The default reads a whole saved model (full, freeze), so ``base`` only gives its class.
        """
        return type(base).from_pretrained(directory, dtype=base.dtype)

    def merge(self, model: nn.Module) -> nn.Module:
        """Return a plain transformers model with what was trained folded into its weights.

        The default is for methods that train base weights directly: the model already is one.
        """
        if self.cannot_merge:
            raise MethodError(f"method '{self.config.name}' cannot be merged into the base weights: {self.cannot_merge}")
        return model
