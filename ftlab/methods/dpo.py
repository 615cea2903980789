"""DPO (Rafailov et al. 2023) and its pairwise variants IPO, SLiC-hinge and robust DPO, on preference
pairs, against a reference model (the base with LoRA disabled, or a frozen copy for adapter=none)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.preference import PairLogps, PairOutput, PreferenceMethod, ReferenceConfig
from ftlab.methods.preference_losses import AVERAGED_LOGPS_LOSS_TYPES, DPO_LOSS_TYPES, dpo_loss

__all__ = ["Dpo", "DpoConfig"]


@dataclass
class DpoConfig(ReferenceConfig):
    loss: str = field(
        default="sigmoid",
        metadata={"help": "sigmoid (DPO) | ipo (per-token averaged log-probs) | hinge (SLiC) | robust (rDPO)",
                  "choices": list(DPO_LOSS_TYPES)},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "probability that a preference label is flipped, in [0, 0.5) (sigmoid, robust)",
                              "min": 0, "lt": 0.5}
    )


class Dpo(PreferenceMethod):
    """Direct preference optimisation: raise the policy's log-ratio to the reference on the chosen
    answer over the rejected one (``method.loss`` picks DPO, IPO, SLiC-hinge or robust DPO)."""

    Config = DpoConfig

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        m = cfg.method
        if m.loss not in DPO_LOSS_TYPES:
            raise ConfigError(f"method.loss={m.loss!r} is not valid; use one of: {', '.join(DPO_LOSS_TYPES)}")
        zero = torch.zeros(1)
        dpo_loss(zero, zero, zero, zero, m.beta, loss_type=m.loss, label_smoothing=m.label_smoothing)  # checks both

    def pair_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], policy: PairLogps,
                  reference: PairLogps | None) -> PairOutput:
        assert reference is not None
        c = self.config
        if c.loss in AVERAGED_LOGPS_LOSS_TYPES:  # IPO: per-token averaged log-probs
            args = (policy.chosen_avg, policy.rejected_avg, reference.chosen_avg, reference.rejected_avg)
        else:
            args = (policy.chosen, policy.rejected, reference.chosen, reference.rejected)
        losses, chosen, rejected = dpo_loss(*args, c.beta, loss_type=c.loss, label_smoothing=c.label_smoothing)
        return PairOutput(losses, chosen, rejected)
