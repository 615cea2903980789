"""GRPO (Shao et al. 2024, DeepSeekMath): RL from verifiable rewards, with the group of completions
of each prompt as its own baseline, no value model and no reward model.

Per training batch (``ftlab.methods.rl`` has the rollouts, masks, log-probs and the reference):

1. every prompt gets ``num_generations`` sampled completions, each scored by the reward function
   (``method.reward``: an ``ftlab.rewards`` plugin, e.g. ``exact``: 1 when the answer is the
   reference answer, else 0);
2. advantages, one per completion: ``A = (r - mean of its group) / (std of its group + 1e-4)``
   (the sample std, Bessel-corrected, as TRL's ``nanstd``), or ``r - mean`` with
   ``scale_rewards=false`` (Dr. GRPO); a group whose rewards are all equal has advantages 0 and
   teaches nothing;
3. per completion token, the clipped surrogate ``-min(r_t A, clip(r_t, 1 - epsilon, 1 +
   epsilon_high) A)`` with ``r_t = pi(token) / pi_old(token)``, plus ``beta * r_t * KL_t`` where
   ``KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1`` (k3) to the reference (the base: LoRA off);
   the factor ``r_t`` (``kl_bias_correction``, TRL 1.16's ``use_bias_correction_kl``, on by default)
   is 1 in value but makes the KL gradient the unbiased reverse-KL gradient (DeepSeek-V3.2):
   ``beta * (grad KL_t + KL_t grad logp_t)``; ``kl_bias_correction=false`` is DeepSeekMath's term;
4. the loss is the mean over the batch's completion tokens (``loss_type=dapo``, TRL 1.16's default:
   the sum over all kept tokens divided by their number), or ``grpo`` (per-sequence means, then the
   mean) or ``dr_grpo`` (sum over ``rows * max_new_tokens``).

One optimizer step per generation batch: the completions are sampled by the current policy and
the step's loss is computed right away, so ``pi_old = pi`` (``old_logps`` is the detached
``logps``): the ratio is exactly 1 and the clip never binds, but the gradient is the policy
gradient ``-A * grad log pi`` (plus the KL's), as in TRL with ``num_iterations=1`` and
``steps_per_generation == gradient_accumulation_steps``. ``epsilon`` matters once a batch is
reused for several steps, which ftlab does not do (yet).

Differences from TRL 1.16's ``GRPOTrainer`` (defaults otherwise as ``GRPOConfig``: ``beta`` 0,
``epsilon`` 0.2, ``scale_rewards`` group, ``loss_type`` dapo, ``use_bias_correction_kl`` true,
``temperature`` 1, ``top_p`` 1, no top-k, ``mask_truncated_completions`` false):

* the token count that normalises ``dapo`` is that of the micro-batch (one Lightning batch: its
  prompts times ``num_generations``); TRL's spans its whole generation batch, which is the same
  unless gradients are accumulated (``trainer.accumulate_grad_batches`` > 1) or several processes
  train (each rank normalises by its own tokens here);
* ``num_generations`` defaults to 4 (TRL: 8) and ``max_new_tokens`` to 32 (TRL: 512), for CPUs;
* the log-probs are computed with position ids counted from the attention mask, as ``generate``
  counts them; TRL passes none, which gives the same numbers for rotary (RoPE) models such as
  Llama (a constant shift of every position changes no attention score) but not for models with
  absolute position embeddings (GPT-2), where a left-padded prompt would be scored at positions
  its tokens were not generated at;
* the reference is the base with the adapters disabled; TRL, given a PEFT model, copies its
  adapter as it is when training starts: the same model, since ftlab's adapter starts at B = 0;
* ``kl`` is logged even with ``beta=0`` (``log_kl``; one no-grad forward of the reference per step);
* no multiple iterations per batch, no vLLM, no entropy masking or bonus, no ``batch`` reward
  scaling, no reward weights (one reward function).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.rl import LOSS_TYPES, RlConfig, RlMethod, clipped_surrogate, k3_kl, masked_loss, masked_mean

__all__ = ["ADVANTAGE_EPS", "Grpo", "GrpoConfig", "group_advantages", "grpo_loss"]

ADVANTAGE_EPS = 1e-4  # TRL's: keeps a group whose rewards barely differ from blowing up


@dataclass
class GrpoConfig(RlConfig):
    num_generations: int = field(default=4, metadata={"help": "completions sampled per prompt (a group); rollouts "
                                                              "per step = data.batch_size * num_generations",
                                                              "min": 2})  # advantages compare a group's completions
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the probability ratio (lower side)", "gt": 0})
    epsilon_high: Optional[float] = field(
        default=None, metadata={"help": "upper clip range (null: epsilon; DAPO uses 0.28)", "gt": 0}
    )
    scale_rewards: bool = field(
        default=True, metadata={"help": "divide each group's advantages by its reward std (false: Dr. GRPO)"}
    )
    loss_type: str = field(
        default="dapo", metadata={"help": "dapo (mean over the batch's tokens, TRL's default) | grpo (per-sequence "
                                          "means) | dr_grpo (sum / (rows * max_new_tokens))", "choices": list(LOSS_TYPES)}
    )
    kl_bias_correction: bool = field(
        default=True, metadata={"help": "multiply the KL term by the probability ratio (DeepSeek-V3.2; TRL's "
                                        "use_bias_correction_kl, on by default): its gradient is then the unbiased "
                                        "reverse-KL gradient, even at ratio 1"}
    )


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """``(r - mean_group) / (std_group + eps)`` for each of the ``[G * n]`` rewards (groups of
    ``group_size`` consecutive rows), or ``r - mean_group`` without ``scale``; std is the sample
    std (Bessel-corrected), as TRL's."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              kl_bias_correction: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GRPO loss from per-token log-probs ``[R, C]`` of the policy (with gradients), of the
    policy that sampled (``old_logps``) and of the reference (``ref_logps``, needed when ``beta``
    is not 0), one advantage per completion ``[R]`` and the completion mask ``[R, C]``; returns the
    loss and the per-token KL term (k3, times the ratio with ``kl_bias_correction``; None without
    ``ref_logps``), as TRL 1.16's ``GRPOTrainer`` computes them for ``importance_sampling_level="token"``."""
    if beta != 0 and ref_logps is None:
        raise ValueError("beta != 0 needs the reference log-probs")
    per_token = clipped_surrogate(logps, old_logps, advantages, epsilon,
                                  epsilon if epsilon_high is None else epsilon_high)
    kl = k3_kl(logps, ref_logps) if ref_logps is not None else None
    if kl is not None and kl_bias_correction:  # value unchanged at ratio 1, gradient + KL * grad(logp)
        kl = kl * torch.exp(logps - old_logps)
    if beta != 0:
        per_token = per_token + beta * kl
    return masked_loss(per_token, mask, loss_type, max_completion_length), kl


class Grpo(RlMethod):
    """Group relative policy optimisation on LoRA adapters, rewarded by a reward function."""

    Config = GrpoConfig

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        m = cfg.method
        if m.loss_type not in LOSS_TYPES:
            raise ConfigError(f"method.loss_type={m.loss_type!r} is not valid; use one of: {', '.join(LOSS_TYPES)}")
        if not float(m.epsilon) > 0:
            raise ConfigError(f"method.epsilon={m.epsilon} must be > 0")
        if m.epsilon_high is not None and not float(m.epsilon_high) > 0:
            raise ConfigError(f"method.epsilon_high={m.epsilon_high} must be > 0 (or null: epsilon)")

    def compute(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        training = model.training
        rollouts = self.rollout(model, batch)
        if training:
            self.last_rollouts = rollouts
            self.last_step_tokens = int(rollouts.prompt_mask.sum() + rollouts.completion_mask.sum())
        advantages = group_advantages(rollouts.rewards, rollouts.group_size, bool(c.scale_rewards))
        mask = rollouts.completion_mask
        if c.mask_truncated_completions:
            mask = mask * (~rollouts.truncated).unsqueeze(1).to(mask.dtype)
        ref_logps = self.reference_logps(model, rollouts) if (c.beta != 0 or c.log_kl) else None
        logps = self.policy_logps(model, rollouts)
        loss, kl = grpo_loss(logps, logps.detach(), advantages.to(logps.device), mask, ref_logps=ref_logps,
                             beta=float(c.beta), epsilon=float(c.epsilon), epsilon_high=c.epsilon_high,
                             loss_type=str(c.loss_type), max_completion_length=int(c.max_new_tokens),
                             kl_bias_correction=bool(c.kl_bias_correction))
        rewards = rollouts.rewards
        grouped_std = rewards.view(-1, rollouts.group_size).std(dim=1)
        metrics = {
            "reward/mean": rewards.mean(),
            "reward/std": rewards.std(),  # over the batch's completions (TRL's reward_std)
            "completion_length": rollouts.lengths.float().mean(),
            "frac_reward_zero_std": torch.isclose(grouped_std, torch.zeros_like(grouped_std)).float().mean(),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
        return loss, metrics
