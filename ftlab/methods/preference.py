"""What the methods that learn from preference pairs share: the pair batch, LoRA or full training,
the reference model, precomputed reference log-probs and the reward metrics.

Hierarchy (each a ``Lora`` underneath, so LoRA's fields, quantized bases, LoRA+ and export come
with it):

* ``PairMethod`` -- trains on ``batch_kind = "preference"`` batches (``chosen_*``, ``rejected_*``
  and ``index``), as LoRA adapters (``method.adapter=lora``, the default; any quantized base LoRA
  takes) or on every weight (``method.adapter=none``, an unquantized base). The reward model
  (``ftlab.methods.reward``) is one.
* ``PreferenceMethod`` -- a policy (the causal LM) scored by the log-probabilities of each pair's
  two answers; ``loss`` and ``validation_metrics`` come from ``pair_loss``, which DPO, ORPO,
  SimPO and KTO implement. Methods with ``uses_reference`` also get the reference model's
  log-probs:

  - with LoRA, the reference is the same model with its adapters disabled
    (``PeftModel.disable_adapter()``, under ``torch.no_grad`` and in eval mode): the frozen base,
    with no second copy in memory;
  - with ``adapter=none``, a deep copy of the base taken in ``apply``, frozen and in eval mode,
    held by the method (not the training module): not in the optimizer, not saved, moved to the
    policy's device on first use;
  - with ``method.precompute_ref=true``, ``before_training`` computes the reference log-probs of
    every training pair once (keyed by the batch's ``index``) and training batches read them
    instead of running the reference; validation batches always compute them.

Log-probabilities are ``ftlab.methods.preference_losses.sequence_logps`` of the answer tokens
(labels != -100), from one forward over chosen and rejected concatenated along the batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ftlab.errors import ConfigError, MethodError
from ftlab.evaluation.generation import eval_mode
from ftlab.methods.base import QUANTIZATIONS, BaseMethod, ObjectiveWithMetrics
from ftlab.methods.lora import Lora, LoraConfig
from ftlab.methods.preference_losses import IGNORE_INDEX, sequence_logps, token_counts

__all__ = ["ADAPTERS", "PAIR_KEYS", "REWARD_METRICS", "PairConfig", "PairLogps", "PairMethod", "PairOutput",
           "PreferenceConfig", "PreferenceMethod", "ReferenceConfig", "concatenated", "mismatched_pairs",
           "pair_metrics"]

log = logging.getLogger("ftlab")

ADAPTERS = ("lora", "none")
PAIR_KEYS = tuple(f"{side}_{key}" for side in ("chosen", "rejected") for key in ("input_ids", "attention_mask", "labels"))
# what every preference method logs during training (``method/<name>``) and at validation (``val/<name>``)
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


# -- configs ----------------------------------------------------------------------------------------


@dataclass
class PairConfig(LoraConfig):
    lr: float = field(default=1e-4, metadata={"help": "learning rate (about 10x less with adapter=none)"})
    dropout: float = field(
        default=0.0,
        metadata={"help": "dropout on the LoRA input (0: the policy then matches its reference exactly at the start)",
                  "min": 0, "lt": 1},
    )
    adapter: str = field(
        default="lora",
        metadata={"help": "lora: train LoRA adapters on a frozen (optionally quantized) base; none: train every weight",
                  "choices": list(ADAPTERS)},
    )


@dataclass
class PreferenceConfig(PairConfig):
    beta: float = field(default=0.1, metadata={"help": "strength of the preference term (the method's beta)", "gt": 0})


@dataclass
class ReferenceConfig(PreferenceConfig):
    precompute_ref: bool = field(
        default=False,
        metadata={"help": "compute the reference log-probs of every training pair once before training, then read them"},
    )


# -- batches ----------------------------------------------------------------------------------------


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]), value=value)


def concatenated(batch: Mapping[str, torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` of ``2B`` rows: the ``B`` chosen sequences, then
    the ``B`` rejected ones, right-padded to one width (``pad_id``, 0, -100), for one forward."""
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise MethodError(f"a preference method got a batch without {', '.join(missing)} (keys: {', '.join(batch)}); "
                          "it trains on pair batches (batch_kind='preference')")
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = []
    for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        out.append(torch.cat([_pad_to(batch[f"chosen_{key}"], width, value),
                              _pad_to(batch[f"rejected_{key}"], width, value)]))
    return out[0], out[1], out[2]


def mismatched_pairs(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                     pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO's mismatched pairs (TRL's KL dataset): row ``k`` is the prompt of row ``k`` (its tokens
    before the first labelled one) followed by the answer of row ``k + 1`` (cyclically; its
    labelled span to its last real token), labelled on that answer only. Right-padded."""
    rows = []
    n = ids.shape[0]
    for k in range(n):
        j = (k + 1) % n
        start_k = int((labels[k] != IGNORE_INDEX).nonzero()[0])
        start_j = int((labels[j] != IGNORE_INDEX).nonzero()[0])
        end_j = int(mask[j].sum())
        prompt, answer = ids[k, :start_k], ids[j, start_j:end_j]
        rows.append((torch.cat([prompt, answer]),
                     torch.cat([torch.full_like(prompt, IGNORE_INDEX), labels[j, start_j:end_j]])))
    width = max(len(r[0]) for r in rows)
    new_ids = torch.full((n, width), pad_id, dtype=ids.dtype, device=ids.device)
    new_mask = torch.zeros((n, width), dtype=mask.dtype, device=mask.device)
    new_labels = torch.full((n, width), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    for k, (row_ids, row_labels) in enumerate(rows):
        new_ids[k, : len(row_ids)] = row_ids
        new_mask[k, : len(row_ids)] = 1
        new_labels[k, : len(row_labels)] = row_labels
    return new_ids, new_mask, new_labels


def pad_id_of_model(model: nn.Module) -> int:
    """The id a sequence classifier reads as padding (its last real token is the one before it); 0
    for a model that has none (any id works for a causal LM: padding is masked and unlabelled)."""
    value = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(value) if value is not None else 0


# -- log-probs and outputs ------------------------------------------------------------------------------


@dataclass
class PairLogps:
    """Per-pair log-probabilities of the answers (sums over answer tokens, and their per-token means)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_avg(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)

    @classmethod
    def split(cls, sums: torch.Tensor, labels: torch.Tensor) -> "PairLogps":
        """From ``2B`` rows (chosen, then rejected) and their labels."""
        b = sums.shape[0] // 2
        counts = token_counts(labels).to(sums.device)
        return cls(sums[:b], sums[b:], counts[:b], counts[b:])


@dataclass
class PairOutput:
    """What ``pair_loss`` returns: the per-pair (or per-example) losses, the rewards of the chosen
    and rejected answers (detached), and any further metrics of the method (scalars)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """``rewards/chosen``, ``rewards/rejected`` (means), ``rewards/margin`` (mean of chosen minus
    rejected) and ``rewards/accuracy`` (share of pairs whose chosen reward is the higher)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margin": (c - r).mean(),
        "rewards/accuracy": (c > r).float().mean(),
    }


# -- the methods ---------------------------------------------------------------------------------------


class PairMethod(ObjectiveWithMetrics, Lora):
    """A method trained on preference pairs, as LoRA adapters (``adapter=lora``) or in full
    (``adapter=none``); subclasses implement ``compute(model, batch)``."""

    Config = PairConfig
    batch_kind: ClassVar[str] = "preference"
    tasks: ClassVar[tuple[str, ...]] = ("causal_lm",)
    quantizations: ClassVar[tuple[str, ...]] = QUANTIZATIONS
    no_packing: ClassVar[str] = "its batches are pairs of whole sequences (chosen and rejected), which are not packed"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # per run, not per class: with adapter=none the base itself trains and the run saves a model
        self.trains_base = self.full
        self.artifact = "model" if self.full else "adapter"

    @property
    def full(self) -> bool:
        return self.config.adapter == "none"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        adapter = cfg.method.get("adapter")
        if adapter not in ADAPTERS:
            raise ConfigError(f"method.adapter={adapter!r} is not valid; use one of: {', '.join(ADAPTERS)}")
        if adapter == "none" and cfg.quantization.name != "none":
            raise ConfigError(
                f"method.adapter=none trains every weight, which a quantization={cfg.quantization.name} base cannot "
                "(4/8-bit weights take no gradients); use method.adapter=lora, or quantization=none"
            )
        if adapter == "lora":
            super().check_config(cfg)

    # -- the model
    def apply(self, model: nn.Module) -> nn.Module:
        if self.full:
            return model.requires_grad_(True)
        return super().apply(model)

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        if self.full:
            return BaseMethod.parameter_groups(self, model, lr)
        return super().parameter_groups(model, lr)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        if self.full:
            return BaseMethod.load(self, base, directory)
        return super().load(base, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        if self.full:  # the trained weights already are the model
            return BaseMethod.merge(self, model)
        return super().merge(model)


class PreferenceMethod(PairMethod):
    """A causal-LM policy trained on pairs; subclasses implement ``pair_loss``."""

    Config = PreferenceConfig
    uses_reference: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = REWARD_METRICS

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.reference: nn.Module | None = None  # adapter=none: the frozen copy of the base
        self._ref_cache: dict[int, torch.Tensor] | None = None  # precompute_ref: index -> [chosen, rejected]

    @property
    def precompute(self) -> bool:
        return bool(getattr(self.config, "precompute_ref", False)) and self.uses_reference

    def apply(self, model: nn.Module) -> nn.Module:
        if self.full and self.uses_reference:
            self.reference = frozen_copy(model)
        return super().apply(model)

    # -- log-probs
    def sequence_logps(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """Summed log-probs of the labelled tokens of each row (float32, ``[rows]``)."""
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return sequence_logps(logits, labels)

    def policy_logps(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> PairLogps:
        ids, mask, labels = concatenated(batch)
        return PairLogps.split(self.sequence_logps(model, ids, mask, labels), labels)

    @contextlib.contextmanager
    def as_reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """The reference model, in eval mode and without gradients: the frozen copy (adapter=none),
        or ``model`` with its adapters disabled."""
        with torch.no_grad():
            if self.reference is not None:
                device = next(model.parameters()).device
                if next(self.reference.parameters()).device != device:
                    self.reference.to(device)
                yield self.reference
                return
            if not hasattr(model, "disable_adapter"):
                raise MethodError(f"method '{self.config.name}' needs a reference model: a PEFT model (adapter=lora) "
                                  f"whose adapters it disables, or adapter=none's frozen copy; got {type(model).__name__}")
            with eval_mode(model), model.disable_adapter():
                yield model

    def reference_sums(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        with self.as_reference(model) as reference:
            return self.sequence_logps(reference, ids, mask, labels)

    def reference_logps(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> PairLogps:
        """The reference's log-probs of the batch's pairs: read from the precomputed table for a
        training batch (``model.training``) when ``precompute_ref`` filled it, else computed."""
        ids, mask, labels = concatenated(batch)
        if self._ref_cache is not None and model.training:
            indices = _indices(batch, self.config.name)
            missing = [i for i in indices if i not in self._ref_cache]
            if missing:
                raise MethodError(f"method '{self.config.name}': no precomputed reference log-probs for training "
                                  f"pairs {missing[:5]} (precompute_ref covers the training set given to before_training)")
            table = torch.stack([self._ref_cache[i] for i in indices]).to(ids.device)  # [B, 2]
            sums = torch.cat([table[:, 0], table[:, 1]])
        else:
            sums = self.reference_sums(model, ids, mask, labels)
        return PairLogps.split(sums, labels)

    def before_training(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> None:
        if not self.precompute:
            self._ref_cache = None
            return
        cache: dict[int, torch.Tensor] = {}
        for batch in batches:
            indices = _indices(batch, self.config.name)
            ids, mask, labels = concatenated(batch)
            sums = self.reference_sums(model, ids, mask, labels).float().cpu()
            b = len(indices)
            for row, index in enumerate(indices):
                cache[index] = torch.stack([sums[row], sums[b + row]])
        self._ref_cache = cache
        log.info("method %s: reference log-probs of %d training pairs computed before training (precompute_ref)",
                 self.config.name, len(cache))

    # -- the objective
    def pair_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], policy: PairLogps,
                  reference: PairLogps | None) -> PairOutput:
        """The method's losses for the batch from the policy's log-probs (with gradients) and the
        reference's (None unless ``uses_reference``)."""
        raise NotImplementedError

    def compute(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_logps(model, batch)
        reference = self.reference_logps(model, batch) if self.uses_reference else None
        out = self.pair_loss(model, batch, policy, reference)
        return out.losses.mean(), {**pair_metrics(out.chosen_rewards, out.rejected_rewards), **out.extra}


def _indices(batch: Mapping[str, torch.Tensor], name: str) -> list[int]:
    index = batch.get("index")
    if index is None:
        raise MethodError(f"method '{name}': precompute_ref needs each pair batch's 'index' (the pairs' positions in "
                          "the training set) to key the reference log-probs")
    return [int(i) for i in torch.as_tensor(index).reshape(-1).tolist()]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen: the reference of full
    fine-tuning (never in the optimizer, never saved)."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()
