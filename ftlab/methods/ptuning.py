"""P-tuning (Liu et al. 2021): virtual-token embeddings produced by a small trained encoder."""

from __future__ import annotations

from dataclasses import dataclass, field

import peft
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.prompt_learning import PromptLearningConfig, PromptLearningMethod

ENCODERS = {"mlp": peft.PromptEncoderReparameterizationType.MLP, "lstm": peft.PromptEncoderReparameterizationType.LSTM}


@dataclass
class PTuningConfig(PromptLearningConfig):
    lr: float = field(default=1e-2, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    encoder: str = field(default="mlp", metadata={"help": "the prompt encoder: mlp or lstm", "choices": list(ENCODERS)})
    encoder_hidden_size: int = field(default=128, metadata={"help": "hidden size of the prompt encoder", "min": 1})


class PTuning(PromptLearningMethod):
    """P-tuning: virtual tokens from a trained MLP/LSTM prompt encoder."""

    Config = PTuningConfig

    def peft_config(self, model: nn.Module) -> peft.PromptEncoderConfig:
        c = self.config
        if c.encoder not in ENCODERS:
            raise ConfigError(f"method.encoder={c.encoder!r} is not valid; use one of: {', '.join(ENCODERS)}")
        return peft.PromptEncoderConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            num_virtual_tokens=c.num_virtual_tokens,
            encoder_reparameterization_type=ENCODERS[c.encoder],
            encoder_hidden_size=c.encoder_hidden_size,
            **self.model_sizes(model),
        )
