"""The method plugin contract: a config dataclass plus a few hooks with sensible defaults.

A method turns a loaded base model into the model to train (``apply``). Everything else the
training module and the export path need from a method (which parameters to optimize and with
which learning rates, the loss, hooks before and after each optimizer step, metrics to log, what
to save and how to load it back, how to merge into plain weights, which quantized bases, tasks
and trainer strategies it accepts) has a default here, so most methods override ``apply`` only.
``ftlab.testing`` checks every hook against a tiny model; docs/plugins.md gives their timing.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Optional

import torch
from torch import nn

from ftlab.errors import MethodError
from ftlab.methods.lm_loss import causal_lm_loss
from ftlab.models.quant import QUANT_NAMES

if TYPE_CHECKING:
    from ftlab.models.architecture import Architecture

__all__ = ["BaseMethod", "MethodConfig", "ObjectiveWithMetrics", "QUANTIZATIONS", "TASKS", "config_fields", "field_default",
           "field_help",
           "reset_optimizer_state"]

_METRIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
QUANTIZATIONS = QUANT_NAMES  # every `quantization=` choice: what a method that keeps its base frozen accepts
TASKS = ("causal_lm", "classification")
# what one batch holds: ``sft`` -- input_ids, attention_mask, labels (one sequence per example);
# ``preference`` -- chosen_input_ids, chosen_attention_mask, chosen_labels, the same three for
# rejected, and index (the pair's position in its split); ``prompt`` -- prompt_input_ids,
# prompt_attention_mask (left-padded), index and split, for methods that generate their answers
BATCH_KINDS = ("sft", "preference", "prompt")
# the model's output layer: ``lm`` -- the base as loaded (the LM head, or a classification head for
# task=classification); ``reward`` -- a scalar head (a sequence classifier with one output)
HEADS = ("lm", "reward")


def batch_size(batch: Mapping[str, Any]) -> int:
    """How many examples (or pairs) a batch holds, whatever its kind: the first dimension of its
    ``input_ids`` (``chosen_input_ids`` for a preference batch)."""
    for key in ("input_ids", "chosen_input_ids"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


@dataclass
class MethodConfig:
    """Base of every method's config node (stored in Hydra's ConfigStore under ``method``).

    ``name`` is filled in by the registry with the entry-point name, so a composed config always
    says which method it selected. ``lr`` lives here because good learning rates differ by
    method (full fine-tuning wants ~10x less than LoRA), so a sweep over methods stays fair.

    A field's type is checked before anything loads; a field may also declare its valid values
    in its ``metadata`` beside ``help`` (``ftlab.schema``): ``min``/``max`` (inclusive), ``gt``/
    ``lt`` (exclusive), ``choices``, ``also`` (values valid outside the range, with their
    meaning: ``{-1: "no limit"}``) and ``check`` (a function of the value), e.g.
    ``r: int = field(default=16, metadata={"help": "rank", "min": 1})``. A subclass that declares
    a field again keeps the range declared here unless it declares its own.
    """

    name: str = "???"
    lr: float = field(default=2e-4, metadata={"help": "learning rate (the optimizer's lr follows it)", "gt": 0})


def config_fields(config_cls: type[MethodConfig]) -> list[dataclasses.Field]:
    """The user-settable fields of a method config (everything but ``name``)."""
    return [f for f in dataclasses.fields(config_cls) if f.name not in ("name", "defaults")]


def _method_name(method: Any) -> str:
    return str(getattr(getattr(method, "config", None), "name", type(method).__name__))


def reset_optimizer_state(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor]) -> int:
    """Forget the optimizer's state (Adam's moments and step count, ...) of ``parameters``, e.g. of
    a block a method has just frozen or is about to unfreeze: the next step that gives one of them
    a gradient starts its state afresh, as for a new parameter. Returns how many had state.

    For torch's optimizers and bitsandbytes' (8-bit, paged), whose state is keyed by parameter;
    the parameter stays in its group, so the learning-rate schedule is untouched."""
    cleared = 0
    for p in parameters:
        if optimizer.state.pop(p, None) is not None:
            cleared += 1
    return cleared


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
        refused_strategies: trainer strategies the method cannot train under, each mapped to the
            reason (``{"ddp": "it changes which parameters train during training"}``). A key
            matches ``trainer.strategy`` when equal to it or a prefix of it followed by ``_``
            (``ddp`` refuses ``ddp_spawn`` and ``ddp_find_unused_parameters_true``, not
            ``deepspeed``); checked with ``quantizations`` and ``tasks`` before any model loads.
        metrics: names the method logs with ``self.log(name, value)`` during training; each
            appears as ``method/<name>`` in the run's loggers and its last value in
            ``metrics.json`` under ``method_metrics``. The contract checks every name listed
            arrives; ``log`` also takes names not listed.
        batch_kind: which batches the method trains and validates on: ``"sft"`` (input_ids,
            attention_mask, labels), ``"preference"`` (chosen_* and rejected_* of each pair, and
            index) or ``"prompt"`` (the prompts alone, for methods that generate the answers);
            ftlab asks the data module for that kind, and a run whose data has no pairs is refused
            before the model loads.
        head: ``"lm"`` (the base as loaded) or ``"reward"``: the base is loaded as a sequence
            classifier with one output (a scalar reward head, newly initialised) in place of its
            LM head, for training and whenever the run is loaded again (eval, export).
        loss_kind: what ``loss`` returns, for the divergence guard (``ftlab.guards``):
            ``"cross_entropy"`` (the mean token cross-entropy, or the label cross-entropy for
            ``task=classification``: a uniform output scores ln of the head's size, and a loss stuck
            there stops the run), ``"positive"`` (never below 0, no such value: preference and reward
            losses) or ``"any"`` (can be 0 or negative: RL surrogates; only non-finite values and weight
            growth are checked). Empty: ``"cross_entropy"`` for batch_kind ``"sft"`` with head ``"lm"``,
            ``"any"`` for ``"prompt"``, ``"positive"`` otherwise; set it when ``loss`` is something else.
    """

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    quantizations: ClassVar[tuple[str, ...]] = ("none",)
    defaults: ClassVar[list[Any]] = []
    artifact: ClassVar[str] = "model"  # run-folder name of what ``save`` writes
    trains_base: ClassVar[bool] = False
    cannot_merge: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = TASKS
    no_packing: ClassVar[str] = ""
    refused_strategies: ClassVar[Mapping[str, str]] = {}
    metrics: ClassVar[tuple[str, ...]] = ()
    batch_kind: ClassVar[str] = "sft"
    head: ClassVar[str] = "lm"
    loss_kind: ClassVar[str] = ""  # "" = from batch_kind and head (see above)
    # set by the training module (``FineTuneModule``) while it trains with this method; None
    # elsewhere, where ``log`` checks its arguments and drops the value
    _log_sink: Optional[Callable[[str, float], None]] = None

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
    @classmethod
    def refuse_model(cls, arch: Architecture, cfg: Any) -> str | None:
        """Why this method cannot train the model ``arch`` describes with this config, or None
        when it can. Asked before any weight loads (``ftlab.config.validate``): ``arch.config`` is
        the model's transformers config and ``arch.skeleton`` its module tree on the meta device,
        which ``ftlab.models.structure`` reads. Name the override that makes it work, where there
        is one (``set method.target_modules=[...]``); ftlab prefixes the method and the model."""
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        """Inject adapters and/or freeze weights; return the model to train."""
        raise NotImplementedError

    # -- training -----------------------------------------------------------------------------
    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; override for per-group learning rates (e.g. LoRA+).

        Called once, when the optimizer is built at the start of ``fit`` (after ``apply``). The
        groups may hold parameters with ``requires_grad=False``: the optimizer skips a parameter
        without a gradient, so a method that unfreezes parameters later (``on_train_step_start``)
        returns them here from the start. At least one parameter must require grad then."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments of the model's forward for a batch; override to add inputs
        the method's model needs (multitask prompt tuning's ``task_ids``)."""
        return dict(batch)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training objective; the default is the causal LM loss over labelled tokens
        (``model(**batch).loss``, with the vocabulary projected at labelled positions only:
        ``ftlab.methods.lm_loss``)."""
        return causal_lm_loss(model, self.model_inputs(batch))

    def validation_metrics(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The metrics of one validation batch (model in eval mode, gradients off), each a number or
        a one-element tensor: the module logs ``val/<name>``, the epoch's mean weighted by batch
        size, and ``metrics.json`` records the last validation's values under ``val_metrics``. It
        must hold ``"loss"`` (``val/loss``, the run's ``val_loss``). The default is the loss alone."""
        return {"loss": self.loss(model, batch)}

    def before_training(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        """Called once per ``fit``, after the optimizer is built and the model is on its device,
        before the first ``on_train_step_start``: for work over the whole training set (the
        reference log-probs of ``precompute_ref``). ``batches`` yields every training batch once,
        in the data's order (not shuffled), on the model's device; it does nothing unless
        iterated. The default does nothing."""

    def on_train_step_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, global_step: int) -> None:
        """Called once per optimizer step, before the forward of its first batch (of the
        accumulation window), for methods whose trainable set changes during training (LISA,
        progressive unfreezing, GaLore-style projections): flip ``requires_grad`` of parameters
        the optimizer holds (see ``parameter_groups``) and reset or rewrite their optimizer state
        (``reset_optimizer_state``). ``optimizer`` is the torch optimizer built from
        ``parameter_groups``, the same object at every step; do not add or remove parameter
        groups (the learning-rate schedule is bound to them). ``global_step`` counts the
        optimizer steps completed before this one: 0 before the first, as ``on_step_end`` gets
        after it. The previous step's gradients may still be on the parameters; they are
        cleared (set to None) before this step's backward."""

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        """Called after every optimizer step (e.g. AdaLoRA's rank budget update): right after
        ``optimizer.step()``, before gradients are zeroed. In a training run ``global_step`` is
        Lightning's, the number of optimizer steps completed before this one (0 after the first)."""

    def log(self, name: str, value: float | int | torch.Tensor) -> None:
        """Log a metric of the method: during training (from ``on_train_step_start``, ``loss`` on
        a training batch or ``on_step_end``) it goes to the run's loggers as ``method/<name>`` at
        the current step, and its last value to ``metrics.json`` (``method_metrics``). Calls at
        any other time (validation, export, the contract's steps outside a run) are checked and
        dropped. ``name``: letters, digits, ``_ . / -``; ``value``: a number or one-element tensor."""
        number = self.metric_value(name, value)
        if self._log_sink is not None:
            self._log_sink(name, number)

    def metric_value(self, name: str, value: float | int | torch.Tensor) -> float:
        """A metric's value as a float, after checking its name and that it is one number (what
        ``log`` and ``validation_metrics`` accept); a ``MethodError`` otherwise."""
        if not isinstance(name, str) or not _METRIC_NAME.match(name):
            raise MethodError(f"method '{_method_name(self)}' logs a metric named {name!r}: use letters, digits and _ . / -")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise MethodError(f"method '{_method_name(self)}' logs {name!r} as a tensor of shape "
                                  f"{tuple(value.shape)}: a metric is one number")
            return float(value.detach().float().item())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MethodError(f"method '{_method_name(self)}' logs {name!r} as {type(value).__name__}: a metric is a number")
        return float(value)

    # -- saving, loading, merging ----------------------------------------------------------------
    def save(self, model: nn.Module, directory: Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> Path:
        """Save what this method trained in HF format (safetensors) and return the folder.

        ``state_dict``: the model's whole weights gathered from every rank, given (on rank 0) when
        the strategy shards them (FSDP, DeepSpeed ZeRO-3), where ``model``'s own tensors hold one
        shard each; save from it instead of reading ``model``'s parameters. Its keys are those of
        ``model.state_dict()``."""
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
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


class ObjectiveWithMetrics:
    """For methods whose objective also yields metrics (preference and RL methods): implement
    ``compute``; the loss then logs the metrics during training (``method/<name>``) and
    validation reports them next to the loss (``val/<name>``). Put it before the method's base
    class: ``class Dpo(ObjectiveWithMetrics, Lora)``."""

    def compute(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean loss of a batch and the method's metrics on it (scalars)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss, metrics = self.compute(model, batch)
        if model.training:
            for name, value in metrics.items():
                self.log(name, value)  # type: ignore[attr-defined]
        return loss

    def validation_metrics(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        loss, metrics = self.compute(model, batch)
        return {"loss": loss, **metrics}
