"""Prompt tuning (Lester et al. 2021): learn soft-prompt embeddings prepended to every input."""

from __future__ import annotations

from dataclasses import dataclass, field

import peft
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.prompt_learning import PromptLearningConfig, PromptLearningMethod

INITS = ("text", "random")


@dataclass
class PromptConfig(PromptLearningConfig):
    init: str = field(default="text", metadata={"help": "text: start from the embeddings of init_text; random",
                                                     "choices": list(INITS)})
    init_text: str = field(
        default="Answer the question correctly and concisely.",
        metadata={"help": "the text whose token embeddings start the prompt (init=text); repeated to fill it"},
    )


class Prompt(PromptLearningMethod):
    """Prompt tuning: soft-prompt embeddings prepended to the input, started from text or random."""

    Config = PromptConfig

    def peft_config(self, model: nn.Module) -> peft.PromptTuningConfig:
        c = self.config
        if c.init not in INITS:
            raise ConfigError(f"method.init={c.init!r} is not valid; use one of: {', '.join(INITS)}")
        text = c.init == "text"
        return peft.PromptTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            num_virtual_tokens=c.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.TEXT if text else peft.PromptTuningInit.RANDOM,
            prompt_tuning_init_text=c.init_text if text else None,
            tokenizer_name_or_path=model.config.name_or_path if text else None,
            **self.model_sizes(model),
        )
