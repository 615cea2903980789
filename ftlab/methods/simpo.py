"""SimPO (Meng et al. 2024): a reference-free preference loss on length-averaged log-probs with a
target margin gamma = gamma_beta_ratio * beta."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ftlab.methods.preference import PairLogps, PairOutput, PreferenceConfig, PreferenceMethod
from ftlab.methods.preference_losses import simpo_loss

__all__ = ["Simpo", "SimpoConfig"]


@dataclass
class SimpoConfig(PreferenceConfig):
    beta: float = field(default=2.0, metadata={"help": "scale of the averaged log-prob difference (the paper: 2 to 10)",
                                                       "gt": 0})
    gamma_beta_ratio: float = field(
        default=0.5, metadata={"help": "target margin over beta: gamma = gamma_beta_ratio * beta (the paper: 0.3 to 1.6)",
                              "min": 0}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "probability that a preference label is flipped, in [0, 0.5)",
                                                                     "min": 0, "lt": 0.5})


class Simpo(PreferenceMethod):
    """Simple preference optimisation: no reference model; the reward of an answer is beta times
    its per-token average log-prob, and the chosen one must win by gamma."""

    Config = SimpoConfig
    uses_reference = False

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        m = cfg.method
        zero = torch.zeros(1)
        simpo_loss(zero, zero, m.beta, m.gamma_beta_ratio, m.label_smoothing)  # raises ConfigError on a bad value

    def pair_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], policy: PairLogps,
                  reference: PairLogps | None) -> PairOutput:
        c = self.config
        losses, chosen, rejected = simpo_loss(policy.chosen_avg, policy.rejected_avg, c.beta, c.gamma_beta_ratio,
                                              c.label_smoothing)
        return PairOutput(losses, chosen, rejected)
