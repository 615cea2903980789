"""What the RL methods share (GRPO now, PPO later): prompt batches, rollouts, completion masks,
per-token log-probabilities, rewards from a reward function, the KL to the reference, the clipped
surrogate and the token-level aggregation of a loss.

An RL method trains on ``batch_kind = "prompt"`` batches (``ftlab.data.datamodule.PROMPT_KEYS``:
left-padded ``prompt_input_ids`` and ``prompt_attention_mask``, ``index`` and ``split``), which the
data module gives with ``connect(..., prompts=True)``. It generates the answers itself, so it needs
the tokenizer and the examples behind the prompts: whoever builds the run calls

    method.use_data(tokenizer, datamodule.train_records, datamodule.val_records)

once the data module is connected (``ftlab.build``); row ``k`` of a batch is then the example
``records(split[k])[index[k]]`` (``record(split, index)``), whose reference answer and prompt text
the reward function reads.

One step of an RL method (``RlMethod.rollout`` then the method's loss):

1. **Rollouts**: each prompt is repeated ``num_generations`` times (rows ``p0 g0, p0 g1, ..., p1 g0,
   ...``: the completions of one prompt are consecutive, a *group*) and ``model.generate`` samples
   an answer for each, in eval mode, under ``torch.no_grad()``, with ``temperature``, ``top_p`` (no
   top-k, as TRL) and at most ``max_new_tokens`` new tokens, stopping at the EOS or end-of-turn token
   (``ftlab.evaluation.generation.stop_token_ids``). Training rollouts draw from the global RNG
   (seeded by the run's ``seed``); rollouts of a batch seen in eval mode (validation) draw from a
   forked RNG seeded by ``method.seed`` and the batch's examples, so a validation is reproducible
   and leaves training's random streams untouched.
2. **Completion mask**: 1 up to and including the first stop token of each completion, 0 after it
   (``completion_mask``; TRL's rule). A completion that never stops is *truncated*
   (``mask_truncated_completions=true`` then leaves it out of the loss, as TRL's flag).
3. **Rewards**: each completion, decoded without special tokens and cut before its stop token, is
   scored by the reward function (``method.reward``, an ``ftlab.rewards`` plugin) with the prompt text
   and the example: ``reward(prompt, completion, record) -> float``.
4. **Log-probabilities** of the completion tokens under the policy (with gradients) and, for the KL,
   under the reference (no gradients): ``per_token_logps``, one forward over prompt + completion with
   the attention mask and position ids counted from it (as ``generate`` counts them, so a left-padded
   prompt is scored at the positions it was sampled at, absolute position embeddings included),
   logits divided by ``temperature`` before the log-softmax (as TRL, so the log-probs are those of
   the distribution the tokens were sampled from).
5. **The reference** is the same PEFT model with its adapters disabled (``PeftModel.disable_adapter()``,
   in eval mode, under ``torch.no_grad()``), as the preference methods do (``ftlab.methods.preference``):
   the frozen (possibly quantized) base, with no second copy in memory. LoRA's B starts at zero, so
   at the first step the policy is its reference and the KL is 0. Only LoRA is supported (the
   method's config extends LoRA's fields; QLoRA bases work): a full-weight RL method would need a
   frozen copy, as the preference methods' ``adapter=none`` keeps.

The KL estimator is ``k3`` (Schulman's "approximating KL divergence"; DeepSeekMath's GRPO, TRL's
``GRPOTrainer``): ``exp(ref - logp) - (ref - logp) - 1`` per token, >= 0, unbiased for
KL(policy || reference) on tokens sampled from the policy.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from torch import nn

from ftlab.data.datamodule import PROMPT_KEYS, PROMPT_SPLITS
from ftlab.data.encode import pad_id_of
from ftlab.errors import ConfigError, MethodError
from ftlab.evaluation.generation import eval_mode, prompt_text, stop_token_ids, until_stop
from ftlab.evaluation.rewards import Reward, call_rewards, get_reward
from ftlab.methods.base import ObjectiveWithMetrics
from ftlab.methods.lora import Lora, LoraConfig

__all__ = ["LOSS_TYPES", "RlConfig", "RlMethod", "Rollouts", "clipped_surrogate",
           "completion_mask", "eval_mode", "k3_kl", "masked_loss", "masked_mean", "per_token_logps", "sample_completions",
           "token_logps"]

# how per-token losses become one number (TRL's ``loss_type`` names; see ``masked_loss``)
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
LOGPS_CHUNK = 8  # rows whose log-softmax is taken at once: bounds the float32 copy of the logits


# -- config -------------------------------------------------------------------------------------------


@dataclass
class RlConfig(LoraConfig):
    lr: float = field(default=5e-5, metadata={"help": "learning rate of the LoRA adapters (not measured yet)"})
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the LoRA input (0: the log-probs training sees are those sampled)",
                              "min": 0, "lt": 1}
    )
    reward: str = field(default="exact", metadata={"help": "reward function: a plugin of the ftlab.rewards group "
                                                           "(exact | normalized | number | json built in)"})
    num_generations: int = field(default=4, metadata={"help": "completions sampled per prompt (a group); rollouts "
                                                              "per step = data.batch_size * num_generations",
                                                              "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use the same)", "gt": 0})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: keep the smallest set of tokens with this "
                                                        "much probability (1 = off)", "gt": 0, "max": 1})
    max_new_tokens: int = field(default=32, metadata={"help": "longest completion, in tokens", "min": 1})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient (TRL's default 0: no KL term in the loss; "
                                                       "DeepSeek-R1 used 0.001, DeepSeekMath 0.04)", "min": 0})
    log_kl: bool = field(default=True, metadata={"help": "compute the KL to the reference for the 'kl' metric even "
                                                         "when beta=0 (one no-grad forward more per step)"})
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "leave completions that hit max_new_tokens without stopping out of the loss"}
    )
    seed: int = field(
        default="${seed}",  # type: ignore[assignment]  # resolved by OmegaConf
        metadata={"help": "seeds the rollouts of validation batches (follows the run's seed)"},
    )


# -- pure functions ---------------------------------------------------------------------------------------


def completion_mask(completion_ids: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, truncated): ``mask[k, t]`` is 1 for the tokens of completion ``k`` up to and including
    its first stop token, 0 after it (generate's padding, or tokens a batch-mate's longer answer
    left); ``truncated[k]`` is True when completion ``k`` has no stop token (it hit the length limit)."""
    is_stop = torch.isin(completion_ids, torch.tensor(list(stop_ids), device=completion_ids.device))
    width = completion_ids.shape[1]
    first = torch.full((completion_ids.shape[0],), width, dtype=torch.long, device=completion_ids.device)
    stopped = is_stop.any(dim=1)
    first[stopped] = is_stop.int().argmax(dim=1)[stopped]
    positions = torch.arange(width, device=completion_ids.device).expand(completion_ids.shape[0], -1)
    return (positions <= first.unsqueeze(1)).long(), ~stopped


def sample_completions(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                       num_generations: int, max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
                       temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> torch.Tensor:
    """``num_generations`` completions of each (left-padded) prompt, as ``[B * G, C]`` new-token ids,
    the completions of prompt ``b`` in rows ``b * G ... b * G + G - 1``; sampled (``temperature``,
    ``top_p``, no top-k) or greedy, in eval mode and without gradients. Rows that stop early are
    padded with ``pad_id`` by ``generate``: mask them with ``completion_mask``."""
    from transformers import GenerationConfig

    ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p,
                                                    "top_k": 0}
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=list(stop_ids),
                              pad_token_id=pad_id, use_cache=True, **sampling)
    with eval_mode(model), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, ids.shape[1]:]


def token_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at ``ids`` (float32, ``ids``' shape); ``logits`` ``[..., V]``
    aligned with ``ids`` (position t scores token t). Rows go ``LOGPS_CHUNK`` at a time."""
    out = []
    for start in range(0, logits.shape[0], LOGPS_CHUNK):
        chunk = logits[start:start + LOGPS_CHUNK].float() / temperature
        picked = chunk.gather(-1, ids[start:start + LOGPS_CHUNK].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out)


def per_token_logps(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """``[R, C]`` log-probs of each completion token given its prompt and the tokens before it
    (float32; positions past the completion mask hold numbers that mean nothing: mask them).

    One forward over ``prompt + completion`` with the attention mask of both and position ids
    counted from it (0 at each row's first real token, as ``generate`` counts them), keeping only
    the last ``C + 1`` positions' logits; gradients flow when the caller allows them."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    width = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=width + 1).logits
    return token_logps(logits[:, -(width + 1):-1], completion_ids, temperature)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1``: the k3 estimator of KL(policy || reference)
    on tokens sampled from the policy (DeepSeekMath's GRPO, TRL), >= 0 and 0 where they agree."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                      epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """Per-token PPO clipped surrogate loss ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)``,
    ``r = exp(logp - old_logp)``; ``advantages`` ``[R]`` (one per sequence) or ``[R, C]``."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` where ``mask`` is 1 (0 when it keeps nothing)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
                max_completion_length: int | None = None) -> torch.Tensor:
    """One loss from per-token losses over the tokens ``mask`` keeps (TRL's ``loss_type``):

    * ``dapo`` (TRL's default): the sum over every kept token of the batch divided by their number
      (each token weighs the same, whatever its sequence's length);
    * ``grpo``: each sequence's mean over its kept tokens, then the mean over sequences (the paper's
      formula; favours short answers when the advantage is positive);
    * ``dr_grpo``: the sum divided by ``rows * max_completion_length`` (a constant: Dr. GRPO)."""
    mask = mask.to(per_token.dtype)
    if loss_type == "dapo":
        return masked_mean(per_token, mask)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ConfigError("loss_type=dr_grpo divides by max_completion_length, which was not given")
        return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    raise ConfigError(f"method.loss_type={loss_type!r} is not valid; use one of: {', '.join(LOSS_TYPES)}")


# -- rollouts -------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """One batch of prompts with ``group_size`` completions each, rows grouped by prompt."""

    prompt_ids: torch.Tensor  # [R, P] left-padded
    prompt_mask: torch.Tensor  # [R, P]
    completion_ids: torch.Tensor  # [R, C]
    completion_mask: torch.Tensor  # [R, C] 1 up to and including the first stop token
    truncated: torch.Tensor  # [R] bool: no stop token within max_new_tokens
    rewards: torch.Tensor  # [R] float32
    records: list[Mapping[str, Any]]  # the example behind each row
    prompts: list[str]  # each row's prompt text (what the reward function got)
    completions: list[str]  # each row's decoded completion
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens of each completion, its stop token included."""
        return self.completion_mask.sum(-1)


# -- the method base ---------------------------------------------------------------------------------------


class RlMethod(ObjectiveWithMetrics, Lora):
    """LoRA trained by reinforcement learning on prompt batches: rollouts, rewards, reference log-probs.
    Subclasses implement the objective (``Grpo.compute``)."""

    Config = RlConfig
    batch_kind: ClassVar[str] = "prompt"
    tasks: ClassVar[tuple[str, ...]] = ("causal_lm",)
    no_packing: ClassVar[str] = "it generates each answer after its own left-padded prompt, which is not packed"
    metrics: ClassVar[tuple[str, ...]] = ("reward/mean", "reward/std", "kl", "completion_length")
    min_generations: ClassVar[int] = 2  # completions per prompt the objective needs
    min_generations_why: ClassVar[str] = "advantages compare the completions of one prompt with each other"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.tokenizer: Any = None
        self.records: tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]] | None = None
        self._reward: Reward | None = None
        self._reward_name = str(getattr(config, "reward", "reward"))
        self._stop_ids: list[int] | None = None
        self.last_rollouts: Rollouts | None = None  # the latest training step's, for inspection
        # real tokens the latest training step processed: every rollout's prompt and completion
        # (what a tokens/s counter should count; the batch itself holds the prompts only)
        self.last_step_tokens: int | None = None

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        super().check_config(cfg)
        m = cfg.method
        get_reward(str(m.reward), "method.reward")  # an unknown or broken reward: the shared one-line error
        if int(m.num_generations) < cls.min_generations:
            raise ConfigError(f"method.num_generations={m.num_generations} must be >= {cls.min_generations}: "
                              f"{cls.min_generations_why}")
        if not float(m.temperature) > 0:
            raise ConfigError(f"method.temperature={m.temperature} must be > 0")
        if not 0 < float(m.top_p) <= 1:
            raise ConfigError(f"method.top_p={m.top_p} must be in (0, 1]")
        if int(m.max_new_tokens) < 1:
            raise ConfigError(f"method.max_new_tokens={m.max_new_tokens} must be >= 1")
        if not float(m.beta) >= 0:
            raise ConfigError(f"method.beta={m.beta} must be >= 0")

    # -- what the run gives the method
    def use_data(self, tokenizer: Any, train_records: Sequence[Mapping[str, Any]],
                 val_records: Sequence[Mapping[str, Any]]) -> None:
        """The tokenizer (to decode completions and find the stop tokens) and the prepared examples
        of both splits (``datamodule.train_records``, ``datamodule.val_records``): a prompt batch's
        row ``k`` is ``records[split[k]][index[k]]``. Called once the data module is connected."""
        self.tokenizer = tokenizer
        self.records = (train_records, val_records)
        self._stop_ids = None

    def record(self, split: int, index: int) -> Mapping[str, Any]:
        if self.records is None:
            raise MethodError(f"method '{self.config.name}' has no examples to read rewards from: call "
                              "method.use_data(tokenizer, datamodule.train_records, datamodule.val_records) once the "
                              "data module is connected with prompts=True")
        records = self.records[split]
        if not 0 <= index < len(records):
            raise MethodError(f"method '{self.config.name}': a prompt batch names {PROMPT_SPLITS[split]} example "
                              f"{index}, but that split has {len(records)}")
        return records[index]

    @property
    def reward_fn(self) -> Reward:
        """The reward function ``method.reward`` names (looked up once); assign a callable to use
        another (tests, notebooks). Held-out prompts are scored with it too (``mean_reward``)."""
        if self._reward is None:
            self._reward, self._reward_name = self.load_reward()
        return self._reward

    def load_reward(self) -> tuple[Reward, str]:
        """The reward this method's config names and its name (``method.reward``, an
        ``ftlab.rewards`` plugin); a method with another source of rewards (PPO's reward model)
        overrides this."""
        return get_reward(str(self.config.reward), "method.reward"), str(self.config.reward)

    @property
    def reward_name(self) -> str:
        """The reward's name, as logs and ``metrics.json`` show it."""
        self.reward_fn  # noqa: B018  (looked up: the name is the one it was found under)
        return self._reward_name

    def reward_key(self) -> Any:
        """What the reward depends on, for the cache key of the base model's mean reward: the
        reward's own ``key()`` when it has one (a reward model's files), else its name."""
        key = getattr(self.reward_fn, "key", None)
        return key() if callable(key) else self.reward_name

    @reward_fn.setter
    def reward_fn(self, function: Reward) -> None:
        self._reward, self._reward_name = function, getattr(function, "__name__", "reward")

    def stop_ids(self, model: nn.Module) -> list[int]:
        if self._stop_ids is None:
            self._stop_ids = stop_token_ids(self._tokenizer(), model)
        return self._stop_ids

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            self.record(0, 0)  # the error saying use_data was not called
        return self.tokenizer

    # -- rollouts
    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in PROMPT_KEYS if k not in batch]
        if missing:
            raise MethodError(f"method '{self.config.name}' got a batch without {', '.join(missing)} (keys: "
                              f"{', '.join(batch)}); it trains on prompt batches (batch_kind='prompt', "
                              "datamodule.connect(..., prompts=True))")

    def _validation_seed(self, batch: Mapping[str, torch.Tensor]) -> int:
        key = [int(self.config.seed), batch["split"].tolist(), batch["index"].tolist()]
        return zlib.crc32(json.dumps(key).encode())

    def rollout(self, model: nn.Module, batch: Mapping[str, torch.Tensor], greedy: bool = False) -> Rollouts:
        """Sample ``num_generations`` completions of every prompt of ``batch`` and score them (steps
        1-3 of the module docstring). In train mode the global RNG samples; in eval mode a forked RNG
        seeded by ``method.seed`` and the batch's examples does."""
        self._check_batch(batch)
        c = self.config
        tokenizer, stop, group = self._tokenizer(), self.stop_ids(model), int(c.num_generations)
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        kwargs = dict(num_generations=group, max_new_tokens=int(c.max_new_tokens), stop_ids=stop,
                      pad_id=pad_id_of(tokenizer), temperature=float(c.temperature), top_p=float(c.top_p), greedy=greedy)
        if model.training:
            completion_ids = sample_completions(model, prompt_ids, prompt_mask, **kwargs)
        else:
            device = prompt_ids.device
            devices = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self._validation_seed(batch))
                completion_ids = sample_completions(model, prompt_ids, prompt_mask, **kwargs)
        mask, truncated = completion_mask(completion_ids, stop)
        records = [self.record(int(s), int(i)) for s, i in zip(batch["split"].tolist(), batch["index"].tolist())
                   for _ in range(group)]
        prompts = [prompt_text(r) for r in records]
        completions = [tokenizer.decode(until_stop(row, stop), skip_special_tokens=True)
                       for row in completion_ids.tolist()]
        rewards = torch.tensor(call_rewards(self.reward_fn, prompts, completions, records, self.reward_name),
                               dtype=torch.float32, device=prompt_ids.device)
        return Rollouts(prompt_ids.repeat_interleave(group, dim=0), prompt_mask.repeat_interleave(group, dim=0),
                        completion_ids, mask, truncated, rewards, records, prompts, completions, group)

    # -- log-probs
    def policy_logps(self, model: nn.Module, rollouts: Rollouts) -> torch.Tensor:
        """The policy's per-token log-probs of the completions, with gradients when enabled."""
        return per_token_logps(model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                               rollouts.completion_mask, float(self.config.temperature))

    @contextlib.contextmanager
    def as_reference(self, model: nn.Module) -> Iterator[nn.Module]:
        """The reference model: ``model`` with its LoRA adapters disabled, in eval mode, without gradients."""
        if not hasattr(model, "disable_adapter"):
            raise MethodError(f"method '{self.config.name}' needs a reference model: a PEFT model whose adapters it "
                              f"disables; got {type(model).__name__}")
        with torch.no_grad(), eval_mode(model), model.disable_adapter():
            yield model

    def reference_logps(self, model: nn.Module, rollouts: Rollouts) -> torch.Tensor:
        with self.as_reference(model) as reference:
            return self.policy_logps(reference, rollouts)
