"""ORPO (Hong et al. 2024): supervised fine-tuning on the chosen answer plus an odds-ratio penalty
on the rejected one, in one loss and without a reference model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ftlab.methods.preference import REWARD_METRICS, PairLogps, PairOutput, PreferenceConfig, PreferenceMethod
from ftlab.methods.preference_losses import orpo_loss

__all__ = ["Orpo", "OrpoConfig"]


@dataclass
class OrpoConfig(PreferenceConfig):
    beta: float = field(default=0.1, metadata={"help": "weight of the odds-ratio term (the paper's lambda)", "gt": 0})


class Orpo(PreferenceMethod):
    """Odds-ratio preference optimisation. The SFT term is the token-level mean negative
    log-likelihood of the chosen answers' tokens (ftlab's SFT loss; TRL also counts the prompt's);
    rewards (for the metrics) are ``beta`` times the per-token average log-probs, as in TRL."""

    Config = OrpoConfig
    uses_reference = False
    metrics = (*REWARD_METRICS, "log_odds_ratio", "nll_loss")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        zero = torch.zeros(1) - 1.0
        orpo_loss(zero, zero, 0.0, cfg.method.beta)  # raises ConfigError on a bad beta

    def pair_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], policy: PairLogps,
                  reference: PairLogps | None) -> PairOutput:
        beta = self.config.beta
        nll = -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)
        losses, log_odds = orpo_loss(policy.chosen_avg, policy.rejected_avg, nll, beta)
        extra = {"log_odds_ratio": log_odds.mean(), "nll_loss": nll.detach()}
        return PairOutput(losses, beta * policy.chosen_avg.detach(), beta * policy.rejected_avg.detach(), extra)
