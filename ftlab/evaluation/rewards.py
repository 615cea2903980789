"""Reward functions for RL from verifiable rewards (GRPO), and the mean reward of a model.

Why plugins: what earns a reward depends on the task (an exact answer, a number, valid JSON, a
format, a unit test passing), so a project registers a reward function in the entry-point group
``ftlab.rewards`` (name -> ``(prompt, completion, record) -> float``) instead of patching ftlab,
exactly as answer checkers are registered in ``ftlab.checkers``. Discovery and lookup by name are
the shared ``ftlab.plugins.discover_group`` / ``Discovered.get``: a plugin that fails to import is
reported with its error and every other reward keeps working; an unknown or broken name is one
``ConfigError`` line.

A reward function gets:

* ``prompt``: the text of the last user message before the answer (``prompt_text(record)``);
* ``completion``: the model's answer, decoded without special tokens and cut before the first
  end-of-turn/EOS token;
* ``record``: the whole prepared example (``{"messages": [...], "task": ..., "answer": ..., "_where":
  ...}`` for the built-in tasks), so a reward can read the reference answer
  (``reference_answer(record)``: the last assistant message) or any other field.

and returns a float. The built-ins are the answer checkers of ``ftlab.evaluation.checkers`` turned
into rewards: ``exact``, ``normalized``, ``number`` and ``json`` give 1.0 when the checker accepts
the completion against the record's reference answer and 0.0 otherwise; a record without a
reference answer is a ``DataError`` naming it. ``registered_reward(name, function)`` makes a
function a reward for the duration, as an entry point would (tests, notebooks, the contract).

Also here, for the run around an RL method (``ftlab.build`` / ``ftlab.train`` call them):

* ``score_rewards`` -- the mean reward of greedy answers to held-out prompts (``mean_reward``
  after training, ``base_mean_reward`` of the base before the method is applied), with
  ``base_reward_cached`` to compute the base's once per base, data and settings;
* ``sample_rollouts`` / ``RolloutSamples`` -- sampled answers with their rewards, the rows an RL run
  appends to ``samples.jsonl`` at every validation.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ftlab.cache import cached_json, fingerprint
from ftlab.errors import ConfigError, DataError, MethodError
from ftlab.evaluation import checkers
from ftlab.data.chat_masking import encode_prompt
from ftlab.data.encode import pad_id_of
from ftlab.evaluation.generation import (default_max_new_tokens, eval_mode, generate, generate_batch,
                                         generation_config, prompt_text, reference_answer, stop_token_ids, until_stop)
from ftlab.evaluation.samples import write_samples
from ftlab.plugins import Discovered, discover_group

__all__ = [
    "ENTRY_POINT_GROUP", "ROLLOUT_COLUMNS", "Reward", "RewardScore", "RolloutSamples", "base_reward_cached",
    "call_reward", "call_rewards", "checker_reward", "discover_rewards", "exact", "get_reward", "json_equal", "normalized", "number",
    "registered_reward", "sample_rollouts", "score_rewards",
]

ENTRY_POINT_GROUP = "ftlab.rewards"

Reward = Callable[[str, str, Mapping[str, Any]], float]


def checker_reward(check: checkers.Checker, name: str) -> Reward:
    """A reward of 1.0 when ``check(completion, reference answer)`` accepts, else 0.0."""

    def reward(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        reference = reference_answer(record)
        if reference is None:
            where = record.get("_where", "an example") if isinstance(record, Mapping) else "an example"
            raise DataError(f"{where}: reward '{name}' compares the answer with the reference answer (the last "
                            "assistant message), and this example has none")
        return 1.0 if check(completion, reference) else 0.0

    reward.__name__ = reward.__qualname__ = name
    reward.__doc__ = f"1.0 when the '{name}' checker accepts the completion against the reference answer, else 0.0."
    return reward


# the built-ins, registered in ftlab's own pyproject like any plugin
exact: Reward = checker_reward(checkers.exact, "exact")
normalized: Reward = checker_reward(checkers.normalized, "normalized")
number: Reward = checker_reward(checkers.number, "number")
json_equal: Reward = checker_reward(checkers.json_equal, "json")


_REGISTERED: dict[str, Reward] = {}  # ``registered_reward``'s, beside the installed entry points


def discover_rewards(entry_points: Iterable[metadata.EntryPoint] | None = None) -> Discovered[Reward]:
    """Every ``ftlab.rewards`` entry point (or the given ones): usable rewards in ``found``,
    broken plugins with why in ``broken``; a lookup by name raises ConfigError. Rewards made
    with ``registered_reward`` are found too (unless ``entry_points`` are given)."""
    found = discover_group(ENTRY_POINT_GROUP, "reward", ConfigError, entry_points=entry_points)
    if entry_points is None:
        found.found.update(_REGISTERED)
    return found


def get_reward(name: str, where: str = "") -> Reward:
    """The reward registered as ``name``; a ConfigError (one line, starting with ``where``, e.g.
    ``method.reward``) that lists the installed and the broken rewards otherwise."""
    return discover_rewards().get(name, where)


@contextlib.contextmanager
def registered_reward(name: str, function: Reward) -> Iterator[None]:
    """Make ``function`` the reward ``name`` for the duration, as an ``ftlab.rewards`` entry point
    would (``method.reward=<name>`` then composes and trains): for tests and notebooks, and for the
    method contract, whose tiny random model never earns a checker reward. A name that is installed
    already is a ConfigError."""
    installed = discover_rewards()
    if name in installed.found or name in installed.broken:
        raise ConfigError(f"reward '{name}' is installed already")
    _REGISTERED[name] = function
    try:
        yield
    finally:
        _REGISTERED.pop(name, None)


def _checked(value: Any, who: str, record: Mapping[str, Any]) -> float:
    """``value`` as a float; a MethodError naming the reward and the example unless it is one finite number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        where = record.get("_where", "an example") if isinstance(record, Mapping) else "an example"
        raise MethodError(f"reward '{who}' returned {value!r} for {where}: a reward is one finite number")
    return float(value)


def call_reward(reward: Reward, prompt: str, completion: str, record: Mapping[str, Any], name: str = "") -> float:
    """``reward(prompt, completion, record)`` as a float; a MethodError when it returns something
    that is not one finite number (``name`` names the reward in it)."""
    return _checked(reward(prompt, completion, record), name or getattr(reward, "__name__", "reward"), record)


def call_rewards(reward: Reward, prompts: Sequence[str], completions: Sequence[str],
                 records: Sequence[Mapping[str, Any]], name: str = "") -> list[float]:
    """The rewards of many completions: through ``reward.batch(prompts, completions, records)`` when
    the reward has one (a reward model scores a batch in one forward), else one call each; every
    value checked as ``call_reward`` checks it."""
    who = name or getattr(reward, "__name__", "reward")
    batch = getattr(reward, "batch", None)
    if batch is None:
        values = [reward(p, c, r) for p, c, r in zip(prompts, completions, records)]
    else:
        values = list(batch(prompts, completions, records))
        if len(values) != len(completions):
            raise MethodError(f"reward '{who}' returned {len(values)} values for {len(completions)} completions")
    return [_checked(v, who, r) for v, r in zip(values, records)]


# -- the mean reward of greedy answers (base and fine-tuned) ---------------------------------------------


@dataclass
class RewardScore:
    mean: float  # mean reward over the prompts
    total: int  # prompts answered
    reward: str  # the reward's name
    samples: list[dict] = field(default_factory=list)  # prompt, reference, prediction, reward


def score_rewards(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    reward: str | Reward = "exact",
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    num_samples: int = 5,
    model_inputs: Callable[[dict[str, torch.Tensor]], dict[str, Any]] | None = None,
) -> RewardScore:
    """The mean reward of the model's greedy answers to ``records`` (in eval mode, without
    gradients, through ``ftlab.evaluation.generation.generate``: the same prompts and decoding as
    exact match). ``max_new_tokens`` None: the longest reference answer plus a little, as for exact
    match (32 tokens when no record has a reference)."""
    name = reward if isinstance(reward, str) else getattr(reward, "__name__", "reward")
    function = get_reward(reward, "reward") if isinstance(reward, str) else reward
    if max_new_tokens is None:
        references = [ref for r in records if (ref := reference_answer(r)) is not None]
        max_new_tokens = default_max_new_tokens(tokenizer, references) if references else 32
    answers = generate(model, tokenizer, records, max_new_tokens, batch_size, model_inputs) if records else []
    values = call_rewards(function, [prompt_text(r) for r in records], answers, records, name)
    samples = [{"prompt": prompt_text(r), "reference": reference_answer(r), "prediction": a, "reward": v}
               for r, a, v in list(zip(records, answers, values))[:num_samples]]
    return RewardScore(sum(values) / len(values) if values else 0.0, len(values), name, samples)


def _reward_cache_file(cache_dir: Path, key: Mapping[str, Any]) -> Path:
    return Path(cache_dir) / "base_reward" / f"{fingerprint(dict(key), strict=False)}.json"


def base_reward_cached(cache_dir: Path, key: Mapping[str, Any],
                       compute: Callable[[], RewardScore]) -> tuple[RewardScore, bool]:
    """The base model's ``RewardScore`` for ``key`` (base, quantization, records, reward, settings),
    computed once across runs and jobs like the base exact match; returns (score, hit)."""

    def entry() -> dict[str, Any]:
        return {"key": dict(key), "score": asdict(compute())}

    return cached_json(_reward_cache_file(cache_dir, key), entry, lambda stored: RewardScore(**stored["score"]))


# -- sampled rollouts for samples.jsonl ------------------------------------------------------------------

ROLLOUT_COLUMNS = ("step", "prompt", "reference", "completion", "reward")


def sample_rollouts(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    reward: str | Reward,
    *,
    num_generations: int = 2,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    step: int | None = None,
) -> list[dict[str, Any]]:
    """``num_generations`` sampled answers to each record's prompt, as an RL method samples them
    (temperature, top_p), each with its reward: rows ``{step, prompt, reference, completion,
    reward, generation}``. Sampling runs in eval mode without gradients under a forked RNG seeded
    with ``seed``: the rows are reproducible and the training RNG is left as found."""
    if not records:
        return []
    name = reward if isinstance(reward, str) else getattr(reward, "__name__", "reward")
    function = get_reward(reward, "reward") if isinstance(reward, str) else reward
    stop, pad_id = stop_token_ids(tokenizer, model), pad_id_of(tokenizer)
    config = generation_config(max_new_tokens, stop, pad_id, do_sample=True, temperature=temperature, top_p=top_p)
    prompts = [encode_prompt(tokenizer, r["messages"]) for r in records for _ in range(num_generations)]
    device = next(model.parameters()).device
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), eval_mode(model), torch.no_grad():
        torch.manual_seed(seed)
        tokens = generate_batch(model, prompts, config, pad_id)
    rows_records = [records[k // num_generations] for k in range(len(tokens))]
    texts = [tokenizer.decode(until_stop(ids, stop), skip_special_tokens=True) for ids in tokens]
    values = call_rewards(function, [prompt_text(r) for r in rows_records], texts, rows_records, name)
    return [{"step": step, "prompt": prompt_text(r), "reference": reference_answer(r), "completion": text,
             "reward": value, "generation": k % num_generations}
            for k, (r, text, value) in enumerate(zip(rows_records, texts, values))]


class RolloutSamples(pl.Callback):
    """After every validation, ``sample_rollouts`` of the first ``num_prompts`` records with the RL
    method's sampling settings, appended to ``out_file`` (``samples.jsonl``) and shown in TensorBoard
    (text) or W&B (a table), as ``ftlab.evaluation.samples.GenerationSamples`` does for greedy answers."""

    def __init__(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, reward: str | Reward, *,
                 num_prompts: int = 2, num_generations: int = 2, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 32, seed: int = 0, out_file: Path | None = None) -> None:
        if num_prompts < 1 or num_generations < 1:
            raise ConfigError(f"rollout samples need num_prompts >= 1 and num_generations >= 1, got "
                              f"{num_prompts} and {num_generations}")
        if isinstance(reward, str):
            get_reward(reward, "reward")  # a misspelt reward fails before training, not at the first validation
        self.records = list(records)[:num_prompts]
        self.tokenizer, self.reward = tokenizer, reward
        self.settings = {"num_generations": num_generations, "temperature": temperature, "top_p": top_p,
                         "max_new_tokens": max_new_tokens, "seed": seed}
        self.out_file = Path(out_file) if out_file is not None else None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.records:
            return
        write_samples(trainer, self.sample(pl_module.model, trainer.global_step), self.out_file, "rollouts",
                      ROLLOUT_COLUMNS)

    def sample(self, model: nn.Module, step: int) -> list[dict[str, Any]]:
        return sample_rollouts(model, self.tokenizer, self.records, self.reward, step=step, **self.settings)
