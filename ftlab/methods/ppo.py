"""PPO (Schulman et al. 2017) for language models, as in RLHF (Ouyang et al. 2022) and TRL's
``PPOTrainer`` (the "N implementation details of RLHF with PPO", Huang et al. 2024; TRL 1.16, the
version ftlab's tests use as an oracle, no longer ships it): a policy
with a value head, rewarded by a reward model (``method.reward_model``: a ``method=reward`` run)
or a reward function (``method.reward``), with a KL penalty to the reference policy.

One *rollout* per ``ppo_epochs * num_mini_batches`` optimizer steps (``ftlab.methods.rl`` has the
sampling, masks, log-probs and the reference):

1. every prompt of the step's batch gets ``num_generations`` sampled completions (1 by default:
   the value head, not the group, is PPO's baseline); each is scored once, ``score`` (a truncated
   completion loses ``missing_eos_penalty`` when that is set);
2. without gradients: the policy's log-probs ``old_logps`` and values ``V_t`` of every completion
   token (one forward: the value head reads the hidden state the LM head reads), and the
   reference's log-probs (the base: LoRA off);
3. per-token rewards ``r_t = -beta * (old_logp_t - ref_logp_t)`` (the k1 KL estimate, TRL's
   default ``kl_estimator``), plus ``score`` on the completion's last token (its stop token, or
   the last one it has); ``whiten_rewards`` scales them to unit variance first;
4. GAE (Schulman et al. 2016): ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` after the last
   token is 0), ``A_t = delta_t + gamma lam A_{t+1}``, returns ``R_t = A_t + V_t``; then the
   advantages are whitened over the rollout's completion tokens (mean 0, variance 1);
5. ``ppo_epochs`` passes over the rollout, each shuffled into ``num_mini_batches`` minibatches
   (seeded by ``method.seed``), one optimizer step each: one Lightning training step each, the
   steps between two rollouts reusing the stored rollout and leaving their own prompt batch
   unused. The schedule moves on at ``on_train_step_start``, so every loss computed within one
   optimizer step sees the same minibatch (``trainer.accumulate_grad_batches`` > 1 is refused:
   raise ``data.batch_size`` and ``num_mini_batches`` instead). The loss of a minibatch:

       pg = mean_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - cliprange, 1 + cliprange))
       vf = 0.5 mean_t max((V'_t - R_t)^2, (V_t + clip(V'_t - V_t, -cliprange_value, cliprange_value) - R_t)^2)
       loss = pg + vf_coef * vf

   ``ratio_t = exp(logp_t - old_logp_t)``, ``V'`` the value head's current prediction, means over
   the minibatch's completion tokens.

The value head is a linear layer (hidden size -> 1, zero-initialised: every value starts at 0) on
the policy's final hidden states, trained with the LoRA adapters; it shares the policy's body
(TRL's ``AutoModelForCausalLMWithValueHead`` layout; TRL's current ``PPOTrainer`` keeps a separate
value model, which would be a second copy of the base). It is a training-time critic: the saved
adapter, the export and generation are the policy alone.

Differences from TRL's former ``PPOTrainer`` (defaults otherwise as its ``PPOConfig``: ``kl_coef`` 0.05,
``cliprange`` 0.2, ``cliprange_value`` 0.2, ``vf_coef`` 0.1, ``gamma`` 1, ``lam`` 0.95,
``num_ppo_epochs`` 4, ``num_mini_batches`` 1, ``whiten_rewards`` false): the score is added on the
completion's last token (TRL adds it one position after the last token while there is room, an
off-by-one its authors keep for reproducibility); the value loss is averaged over the completion
tokens (TRL's mask has one more position); temperature 1 (TRL 0.7) and 32 new tokens (TRL 53).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional

import torch
from torch import nn

from ftlab.errors import ConfigError, MethodError
from ftlab.methods.rl import RlConfig, RlMethod, Rollouts, k3_kl, masked_mean, per_token_logps

__all__ = ["VALUE_HEAD", "Experience", "Ppo", "PpoConfig", "PpoLoss", "attach_value_head", "gae",
           "masked_whiten", "ppo_loss", "token_rewards"]

VALUE_HEAD = "v_head"  # the value head's module name on the policy (a PeftModel)
WHITEN_EPS = 1e-8  # TRL's


@dataclass
class PpoConfig(RlConfig):
    num_generations: int = field(default=1, metadata={"help": "completions sampled per prompt; rollouts per "
                                                              "step = data.batch_size * num_generations",
                                                              "min": 1})
    reward_model: Optional[str] = field(
        default=None, metadata={"help": "a method=reward run folder (or its adapter/model folder, or an ftlab export "
                                        "of it) whose score is the reward; null: the function method.reward names"}
    )
    beta: float = field(default=0.05, metadata={"help": "KL penalty coefficient in the per-token reward (TRL's "
                                                        "kl_coef)", "min": 0})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch", "min": 1})
    num_mini_batches: int = field(default=1, metadata={"help": "minibatches per pass; optimizer steps per rollout "
                                                               "= ppo_epochs * num_mini_batches", "min": 1})
    cliprange: float = field(default=0.2, metadata={"help": "clip range of the policy's probability ratio", "gt": 0})
    cliprange_value: float = field(default=0.2, metadata={"help": "clip range of the value prediction around the "
                                                                  "rollout's value", "gt": 0})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss", "min": 0})
    gamma: float = field(default=1.0, metadata={"help": "discount factor of GAE", "min": 0, "max": 1})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE (1: Monte-Carlo returns, 0: one-step TD)", "min": 0,
                                                       "max": 1})
    whiten_rewards: bool = field(default=False, metadata={"help": "scale the per-token rewards of a rollout to unit "
                                                                  "variance before GAE"})
    missing_eos_penalty: Optional[float] = field(
        default=None, metadata={"help": "subtracted from the score of a completion that hit max_new_tokens without "
                                        "stopping (null: none)"}
    )


# -- pure functions ---------------------------------------------------------------------------------------


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the positions ``mask`` keeps (the unbiased,
    Bessel-corrected variance, as TRL); ``shift_mean=False`` adds the mean back (scales only).
    Fewer than two kept positions have no variance: they are only centred. Not masked itself."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = masked_mean(values, mask)
    centred = values - mean
    if count < 2:
        return centred if shift_mean else values
    variance = (centred.pow(2) * mask).sum() / (count - 1)
    whitened = centred * torch.rsqrt(variance + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None,
                  mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``[R, C]`` per-token rewards: ``-beta * (logp - ref_logp)`` on every kept token (nothing
    without a reference) plus each row's ``score`` on its last kept token; 0 outside ``mask``."""
    mask = mask.to(logps.dtype)
    rewards = torch.zeros_like(logps) if ref_logps is None else -beta * (logps - ref_logps)
    rewards = rewards * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    kept = mask.sum(-1) > 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows[kept], last[kept]] += scores.to(rewards.dtype)[kept]
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns ``[R, C]`` of per-token ``rewards`` and
    ``values``, each row's kept tokens a prefix (``mask``): the value after a row's last kept token
    is 0 (the episode ends there). Both are 0 outside ``mask``."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    width = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(width)):
        following = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        out.append(running)
    advantages = torch.stack(out[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


@dataclass
class PpoLoss:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    clipfrac: torch.Tensor  # share of tokens whose ratio left the clip range
    value_clipfrac: torch.Tensor  # share of tokens whose clipped value loss was the larger
    approx_kl: torch.Tensor  # 0.5 * mean (logp - old_logp)^2: how far this pass moved the policy


def ppo_loss(logps: torch.Tensor, values: torch.Tensor, old_logps: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, cliprange: float = 0.2,
             cliprange_value: float = 0.2, vf_coef: float = 0.1) -> PpoLoss:
    """The clipped policy loss plus ``vf_coef`` times the clipped value loss, each a mean over the
    tokens ``mask`` keeps (all ``[R, C]``; ``logps`` and ``values`` carry the gradients)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    policy = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    value_losses = (values - returns).pow(2)
    clipped_value_losses = (clipped_values - returns).pow(2)
    policy_loss = masked_mean(policy, mask)
    value_loss = 0.5 * masked_mean(torch.max(value_losses, clipped_value_losses), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > cliprange).float(), mask)
        value_clipfrac = masked_mean((clipped_value_losses > value_losses).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.pow(2), mask)
    return PpoLoss(policy_loss + vf_coef * value_loss, policy_loss, value_loss, clipfrac, value_clipfrac, approx_kl)


# -- the value head -----------------------------------------------------------------------------------------


def attach_value_head(model: nn.Module) -> nn.Linear:
    """A zero-initialised ``hidden -> 1`` linear layer on ``model`` (as ``model.v_head``), sized by
    the input of its LM head; returned. It trains with the model and is not in its saved adapter."""
    output = model.get_output_embeddings()
    hidden = getattr(output, "in_features", None) or getattr(model.config, "hidden_size", None)
    if not hidden:
        raise MethodError(f"cannot size a value head: {type(output).__name__} has no in_features and the model "
                          "config no hidden_size")
    head = nn.Linear(int(hidden), 1, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.add_module(VALUE_HEAD, head)
    return head


def logps_and_values(model: nn.Module, rollouts: Rollouts, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's per-token log-probs ``[R, C]`` of the completions and the value head's values
    ``[R, C]`` (float32) of the states they were sampled in, from one forward: the value head reads
    the final hidden states the LM head reads (caught by a hook on its input)."""
    head = getattr(model, VALUE_HEAD, None)
    if head is None:
        raise MethodError("the PPO policy has no value head: build it with Ppo.apply (attach_value_head)")
    caught: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: caught.append(args[0]))
    try:
        logps = per_token_logps(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                rollouts.completion_mask, temperature)
    finally:
        hook.remove()
    width = rollouts.completion_ids.shape[1]
    hidden = caught[-1][:, -(width + 1):-1]
    values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
    return logps, values


# -- the method ---------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """A scored rollout with everything the PPO passes over it need (all ``[R, C]`` but ``scores``)."""

    rollouts: Rollouts
    mask: torch.Tensor  # the completion tokens the loss counts
    scores: torch.Tensor  # [R] each completion's score (penalty included)
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor
    kl: torch.Tensor  # k3 per token (for the metric), 0 without a reference pass
    metrics: dict[str, torch.Tensor]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[index] for name in
                ("mask", "old_logps", "old_values", "advantages", "returns")}


class Ppo(RlMethod):
    """PPO with a value head on LoRA adapters, rewarded by a reward model or a reward function."""

    Config = PpoConfig
    min_generations: ClassVar[int] = 1
    min_generations_why: ClassVar[str] = "every prompt needs a completion"
    metrics: ClassVar[tuple[str, ...]] = RlMethod.metrics + ("score", "policy_loss", "value_loss", "clipfrac",
                                                             "approx_kl")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._experience: Experience | None = None
        self._queue: list[torch.Tensor] = []  # minibatch rows still to train on from the stored rollout
        self._current: torch.Tensor | None = None  # the rows of this optimizer step's minibatch
        self._rollouts_done = 0
        # in a run, the schedule moves on once per optimizer step (``on_train_step_start``), so any
        # further loss in the same step (a gradient check) sees the same minibatch; a caller that
        # never calls the hook moves it on at every loss
        self._hooked = False
        self._new_step = False

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        m = cfg.method
        accumulate = int(cfg.get("trainer", {}).get("accumulate_grad_batches", 1) or 1)
        if accumulate > 1:
            raise ConfigError(f"trainer.accumulate_grad_batches={accumulate}: PPO makes one optimizer step per "
                              "minibatch of its rollout; for larger rollouts raise data.batch_size (prompts per "
                              "rollout) and method.num_mini_batches instead")
        for name in ("ppo_epochs", "num_mini_batches"):
            if int(m[name]) < 1:
                raise ConfigError(f"method.{name}={m[name]} must be >= 1")
        for name in ("cliprange", "cliprange_value"):
            if not float(m[name]) > 0:
                raise ConfigError(f"method.{name}={m[name]} must be > 0")
        if not float(m.vf_coef) >= 0:
            raise ConfigError(f"method.vf_coef={m.vf_coef} must be >= 0")
        for name in ("gamma", "lam"):
            if not 0 <= float(m[name]) <= 1:
                raise ConfigError(f"method.{name}={m[name]} must be in [0, 1]")
        if m.reward_model is not None:
            from pathlib import Path

            folder = Path(str(m.reward_model)).expanduser()
            if not folder.is_dir():
                raise ConfigError(f"method.reward_model={m.reward_model}: no such folder (give a method=reward run "
                                  "folder, its adapter or model folder, or an ftlab export of it)")

    # -- the reward: a reward model when one is given
    def load_reward(self) -> tuple[Any, str]:
        if getattr(self.config, "reward_model", None) is None:
            return super().load_reward()
        from ftlab.methods.reward import RewardModel

        model = RewardModel(str(self.config.reward_model))
        return model, model.__name__

    # -- the model
    def apply(self, model: nn.Module) -> nn.Module:
        policy = super().apply(model)
        attach_value_head(policy)
        return policy

    # -- the objective
    def experience(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Experience:
        """Sample and score a rollout of ``batch``, and compute what every pass over it reuses
        (steps 1-4 of the module docstring)."""
        c = self.config
        rollouts = self.rollout(model, batch)
        mask = rollouts.completion_mask.float()
        if c.mask_truncated_completions:
            mask = mask * (~rollouts.truncated).unsqueeze(1).float()
        scores = rollouts.rewards.clone()
        if c.missing_eos_penalty is not None:
            scores = scores - float(c.missing_eos_penalty) * rollouts.truncated.float()
        beta = float(c.beta)
        with torch.no_grad():
            old_logps, old_values = logps_and_values(model, rollouts, float(c.temperature))
            ref_logps = self.reference_logps(model, rollouts) if (beta != 0 or c.log_kl) else None
            rewards = token_rewards(scores, old_logps, ref_logps if beta != 0 else None, mask, beta)
            if c.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = gae(rewards, old_values, mask, float(c.gamma), float(c.lam))
            advantages = masked_whiten(advantages, mask) * mask
            kl = k3_kl(old_logps, ref_logps) * mask if ref_logps is not None else torch.zeros_like(old_logps)
        metrics = {
            "reward/mean": rollouts.rewards.mean(),
            "reward/std": rollouts.rewards.std() if rollouts.rewards.numel() > 1 else torch.zeros(()),
            "score": scores.mean(),
            "completion_length": rollouts.lengths.float().mean(),
        }
        if ref_logps is not None:
            metrics["kl"] = masked_mean(kl, mask)
        return Experience(rollouts, mask, scores, old_logps, old_values, advantages, returns, kl, metrics)

    def _minibatches(self, rows: int) -> list[torch.Tensor]:
        """``ppo_epochs`` shuffled passes over ``rows`` rows, ``num_mini_batches`` index sets each;
        the shuffles are seeded by ``method.seed`` and the rollout's number (no global RNG drawn)."""
        generator = torch.Generator().manual_seed(int(self.config.seed) * 1_000_003 + self._rollouts_done)
        out: list[torch.Tensor] = []
        for _ in range(int(self.config.ppo_epochs)):
            order = torch.randperm(rows, generator=generator)
            out.extend(chunk for chunk in order.chunk(int(self.config.num_mini_batches)) if chunk.numel())
        return out

    def update(self, model: nn.Module, experience: Experience, index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The PPO loss of the rows ``index`` of a rollout under the current policy (step 5)."""
        c = self.config
        r = experience.rollouts
        device = r.prompt_ids.device
        index = index.to(device)
        part = Rollouts(r.prompt_ids[index], r.prompt_mask[index], r.completion_ids[index], r.completion_mask[index],
                        r.truncated[index], r.rewards[index], [], [], [], 1)
        logps, values = logps_and_values(model, part, float(c.temperature))
        old = experience.rows(index)
        out = ppo_loss(logps, values, old["old_logps"], old["old_values"], old["advantages"], old["returns"],
                       old["mask"], cliprange=float(c.cliprange), cliprange_value=float(c.cliprange_value),
                       vf_coef=float(c.vf_coef))
        if model.training:
            self.last_step_tokens = int(part.prompt_mask.sum() + part.completion_mask.sum())
        metrics = {"policy_loss": out.policy_loss.detach(), "value_loss": out.value_loss.detach(),
                   "clipfrac": out.clipfrac, "value_clipfrac": out.value_clipfrac, "approx_kl": out.approx_kl}
        return out.loss, metrics

    def compute(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not model.training:  # validation: a fresh rollout of the batch, scored by one pass over all of it
            experience = self.experience(model, batch)
            loss, metrics = self.update(model, experience, torch.arange(experience.mask.shape[0]))
            return loss, {**experience.metrics, **metrics}
        if self._current is None or self._new_step or not self._hooked:
            if not self._queue:
                self._experience = self.experience(model, batch)
                self.last_rollouts = self._experience.rollouts
                self._queue = self._minibatches(self._experience.mask.shape[0])
                self._rollouts_done += 1
            self._current = self._queue.pop(0)
            self._new_step = False
        assert self._experience is not None
        loss, metrics = self.update(model, self._experience, self._current)
        return loss, {**self._experience.metrics, **metrics}

    def on_train_step_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, global_step: int) -> None:
        self._hooked, self._new_step = True, True
