"""Prefix tuning (Li & Liang 2021): learn key/value prefixes for the attention of every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import peft
from torch import nn

from ftlab.methods.prompt_learning import PromptLearningConfig, PromptLearningMethod


@dataclass
class PrefixConfig(PromptLearningConfig):
    lr: float = field(default=1e-2, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    projection: bool = field(
        default=False, metadata={"help": "reparameterise the prefixes through a 2-layer MLP (the paper's trick for stability)"}
    )
    encoder_hidden_size: int = field(default=512, metadata={"help": "hidden size of that MLP (projection=true)", "min": 1})


class Prefix(PromptLearningMethod):
    """Prefix tuning: trained key/value prefixes in every attention layer."""

    Config = PrefixConfig
    tasks = ("causal_lm",)  # PEFT's sequence classifier feeds prefixes as past key values, which it refuses for Llama

    def peft_config(self, model: nn.Module) -> peft.PrefixTuningConfig:
        c = self.config
        return peft.PrefixTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            num_virtual_tokens=c.num_virtual_tokens,
            prefix_projection=c.projection,
            encoder_hidden_size=c.encoder_hidden_size,
        )
