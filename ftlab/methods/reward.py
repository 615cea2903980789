"""A reward model: the base with a scalar head, trained on preference pairs with the Bradley-Terry
loss (Ouyang et al. 2022), as LoRA adapters (the head trains in full and is saved with them, PEFT's
``modules_to_save``) or fully (``method.adapter=none``), for a later PPO/GRPO run to score answers.

The head replaces the LM head (``head = "reward"``): ftlab loads the base as a sequence classifier
with one output, which reads the last real token of a conversation (right padding, the tokenizer's
pad id). ``load_reward_model(path)`` loads a finished run folder, its ``adapter``/``model`` folder
or an ``ftlab export`` of it, and ``reward_scores`` scores a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.preference import PairConfig, PairMethod, concatenated, pad_id_of_model
from ftlab.methods.preference_losses import bradley_terry_loss

__all__ = ["REWARD_METRICS", "Reward", "RewardConfig", "load_reward_model", "reward_scores"]

REWARD_METRICS = ("reward_accuracy", "reward_margin")


@dataclass
class RewardConfig(PairConfig):
    margin: float = field(
        default=0.0,
        metadata={"help": "Bradley-Terry margin: the loss asks r(chosen) - r(rejected) to exceed it (0: plain BT)"},
    )


def reward_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each right-padded sequence, ``[B]`` float32 (gradients flow when enabled)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ConfigError(f"a reward model has one output per sequence; this model gives logits of shape {tuple(logits.shape)}")
    return logits[:, 0].float()


class Reward(PairMethod):
    """Bradley-Terry reward model: a scalar head trained so that the chosen answer scores higher,
    ``-log sigmoid(r(chosen) - r(rejected) - margin)`` per pair."""

    Config = RewardConfig
    head = "reward"
    metrics = REWARD_METRICS

    def compute(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, mask, _ = concatenated(batch, pad_id_of_model(model))
        scores = reward_scores(model, ids, mask)
        b = scores.shape[0] // 2
        chosen, rejected = scores[:b], scores[b:]
        margin = batch.get("margin")  # a per-pair margin the data gives wins over method.margin
        if margin is None and self.config.margin:
            margin = torch.full_like(chosen, float(self.config.margin))
        losses = bradley_terry_loss(chosen, rejected, margin)
        diff = (chosen - rejected).detach()
        return losses.mean(), {"reward_accuracy": (diff > 0).float().mean(), "reward_margin": diff.mean()}


def load_reward_model(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, Any]:
    """A trained reward model and its tokenizer, in eval mode, from ``path``: a finished run folder
    of ``method=reward`` (its base loaded as the run did, quantization included), the run's
    ``adapter`` or ``model`` folder, or an ``ftlab export`` of the run (adapter or model)."""
    from transformers import AutoModelForSequenceClassification

    from ftlab.deploy.run_loading import is_run_folder, open_run
    from ftlab.models.loading import load_tokenizer

    folder = Path(path)
    if is_run_folder(folder):
        loaded = open_run(folder).load()
        if loaded.method.head != "reward":
            raise ConfigError(f"{folder}: a run of method '{loaded.method.config.name}', not a reward model (method=reward)")
        model, tokenizer = loaded.model, loaded.tokenizer
    elif (folder / "adapter_config.json").is_file():
        import peft

        config = json.loads((folder / "adapter_config.json").read_text())
        tokenizer = load_tokenizer(folder)
        base = AutoModelForSequenceClassification.from_pretrained(
            config["base_model_name_or_path"], num_labels=1, pad_token_id=tokenizer.pad_token_id)
        model = peft.PeftModel.from_pretrained(base, folder)
    elif (folder / "config.json").is_file():
        tokenizer = load_tokenizer(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    else:
        raise ConfigError(f"{folder}: not a reward model (a run folder of method=reward, its adapter/model folder, "
                          "or an ftlab export of it)")
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels != 1:
        raise ConfigError(f"{folder}: a model with {num_labels} outputs, not a reward model (one output)")
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
