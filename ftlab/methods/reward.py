"""A reward model: the base with a scalar head, trained on preference pairs with the Bradley-Terry
loss (Ouyang et al. 2022), as LoRA adapters (the head trains in full and is saved with them, PEFT's
``modules_to_save``) or fully (``method.adapter=none``), for a later PPO/GRPO run to score answers.

The head replaces the LM head (``head = "reward"``): ftlab loads the base as a sequence classifier
with one output, which reads the last real token of a conversation (right padding, the tokenizer's
pad id). ``load_reward_model(path)`` loads a finished run folder, its ``adapter``/``model`` folder
or an ``ftlab export`` of it, and ``reward_scores`` scores a batch. ``RewardModel(path)`` is a
reward model as a reward function (what ``method=ppo method.reward_model=PATH`` scores rollouts
with): it renders each prompt and completion as the conversation the model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ftlab.errors import ConfigError, DataError
from ftlab.methods.preference import PairConfig, PairMethod, concatenated, pad_id_of_model
from ftlab.methods.preference_losses import bradley_terry_loss

__all__ = ["REWARD_METRICS", "Reward", "RewardConfig", "RewardModel", "load_reward_model", "reward_scores"]

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


class RewardModel:
    """A trained reward model as a reward function ``(prompt, completion, record) -> float``, with
    ``batch`` to score many completions in one forward (``ftlab.evaluation.rewards.call_rewards``).

    Each completion is scored as the conversation the reward model was trained on: the record's
    messages up to its final answer, then the completion as the assistant's answer, through the
    reward model's own chat template (``encode_chat``), right-padded with its pad id. The model
    loads on first use (``load_reward_model``), frozen and in eval mode, onto the current CUDA
    device when there is one (each DDP rank's own), else the CPU."""

    def __init__(self, path: str | Path, batch_size: int = 16) -> None:
        self.path = Path(path).expanduser().resolve()
        self.batch_size = int(batch_size)
        self.__name__ = f"reward_model:{self.path}"
        self._loaded: tuple[nn.Module, Any] | None = None

    def key(self) -> dict[str, Any]:
        """The folder and its files' sizes and times: a retrained model in the same folder is another key."""
        files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
        return {"reward_model": str(self.path),
                "files": [[str(p.relative_to(self.path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}

    def model(self) -> tuple[nn.Module, Any]:
        if self._loaded is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            model, tokenizer = load_reward_model(self.path, device)
            model.requires_grad_(False)
            self._loaded = (model, tokenizer)
        return self._loaded

    def __call__(self, prompt: str, completion: str, record: Mapping[str, Any]) -> float:
        return self.batch([prompt], [completion], [record])[0]

    def batch(self, prompts: Sequence[str], completions: Sequence[str],
              records: Sequence[Mapping[str, Any]]) -> list[float]:
        from ftlab.data.chat_masking import encode_chat

        model, tokenizer = self.model()
        pad = pad_id_of_model(model)
        limit = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        device = next(model.parameters()).device
        out: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            rows = []
            for completion, record in zip(completions[start:start + self.batch_size], records[start:start + self.batch_size]):
                messages = [*prompt_messages(record), {"role": "assistant", "content": completion}]
                rows.append(encode_chat(tokenizer, messages, limit)["input_ids"])
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
            with torch.no_grad():
                out.extend(reward_scores(model, ids, mask).tolist())
        return out


def prompt_messages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The record's conversation before its final answer (all of it when it ends with a user turn)."""
    messages = list(record.get("messages") or [])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages:
        raise DataError(f"{record.get('_where', 'an example')}: no prompt messages for the reward model to score")
    return messages
