"""Multitask prompt tuning (Wang et al. 2023): one shared soft prompt, scaled per task by a
low-rank matrix. Every example of ftlab's data is task ``task_id``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import peft
import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.prompt_learning import PromptLearningConfig, PromptLearningMethod


@dataclass
class MultitaskPromptConfig(PromptLearningConfig):
    num_tasks: int = field(default=1, metadata={"help": "how many tasks have their own prompt scaling", "min": 1})
    num_ranks: int = field(default=1, metadata={"help": "rank of each task's prompt scaling", "min": 1})
    task_id: int = field(default=0, metadata={"help": "the task the training data belongs to", "min": 0})


class MultitaskPrompt(PromptLearningMethod):
    """Multitask prompt tuning: a shared soft prompt with a low-rank scaling per task."""

    Config = MultitaskPromptConfig

    def peft_config(self, model: nn.Module) -> peft.MultitaskPromptTuningConfig:
        c = self.config
        if not 0 <= c.task_id < c.num_tasks:
            raise ConfigError(f"method.task_id={c.task_id} must be in [0, method.num_tasks={c.num_tasks})")
        return peft.MultitaskPromptTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            num_virtual_tokens=c.num_virtual_tokens,
            num_tasks=c.num_tasks,
            num_ranks=c.num_ranks,
            prompt_tuning_init=peft.MultitaskPromptTuningInit.RANDOM,
            **self.model_sizes(model),
        )

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        ids = batch["input_ids"]
        return {**batch, "task_ids": torch.full((ids.shape[0],), self.config.task_id, dtype=torch.long, device=ids.device)}
