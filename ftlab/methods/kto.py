"""KTO (Ethayarajh et al. 2024): learn from answers labelled desirable or undesirable, one at a time.

From preference pairs, as TRL does: each pair's chosen answer is a desirable example and its
rejected answer an undesirable one, so a batch of ``B`` pairs is ``2B`` unpaired examples. The
reference point ``z0`` (KTO's KL term) is estimated per batch as in the paper and TRL: the mean
of ``log pi(y'|x) - log pi_ref(y'|x)`` over mismatched pairs, the prompt of each example with
the answer of the next one in the batch (cyclically, over the ``2B`` examples), computed without
gradients, clamped at 0. With one pair per batch the "mismatched" answer is the pair's other
answer. Under data parallelism each process uses its own batch's estimate (TRL all-reduces it).
With ``precompute_ref`` the reference log-probs of the examples are read from the table; those of
the mismatched pairs, which depend on the batch, are still computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ftlab.methods.preference import (REWARD_METRICS, PairLogps, PairOutput, PreferenceMethod, ReferenceConfig,
                                      concatenated, mismatched_pairs)
from ftlab.methods.preference_losses import kto_kl_estimate, kto_loss

__all__ = ["Kto", "KtoConfig"]


@dataclass
class KtoConfig(ReferenceConfig):
    desirable_weight: float = field(default=1.0, metadata={"help": "weight of the desirable (chosen) examples' losses",
                                                                     "gt": 0})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "weight of the undesirable (rejected) examples' losses", "gt": 0}
    )


class Kto(PreferenceMethod):
    """Kahneman-Tversky optimisation on the chosen (desirable) and rejected (undesirable) answers."""

    Config = KtoConfig
    metrics = (*REWARD_METRICS, "kl")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        m = cfg.method
        zero = torch.zeros(1)
        kto_loss(zero, zero, torch.ones(1, dtype=torch.bool), 0.0, m.beta, m.desirable_weight, m.undesirable_weight)

    def kl_estimate(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``z0`` of the batch: policy against reference on the mismatched pairs, no gradients."""
        ids, mask, labels = mismatched_pairs(*concatenated(batch))
        with torch.no_grad():
            policy = self.sequence_logps(model, ids, mask, labels)
        reference = self.reference_sums(model, ids, mask, labels)
        return kto_kl_estimate(policy, reference)

    def pair_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], policy: PairLogps,
                  reference: PairLogps | None) -> PairOutput:
        assert reference is not None
        c = self.config
        kl = self.kl_estimate(model, batch)
        b = policy.chosen.shape[0]
        desirable = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)]).to(policy.chosen.device)
        losses, rewards = kto_loss(torch.cat([policy.chosen, policy.rejected]),
                                   torch.cat([reference.chosen, reference.rejected]), desirable, kl, c.beta,
                                   c.desirable_weight, c.undesirable_weight)
        return PairOutput(losses, rewards[:b], rewards[b:], {"kl": kl})
