"""(IA)³ (Liu et al. 2022): learn vectors that rescale keys, values and the MLP's activations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import peft
from torch import nn

from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod, module_names


@dataclass
class IA3Config(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate ((IA)³ wants ~10x LoRA's)"})
    target_modules: Optional[Any] = field(
        default=None, metadata={"help": "modules to rescale; null = PEFT's choice for the architecture (k, v, down proj)"}
    )
    feedforward_modules: Optional[Any] = field(
        default=None, metadata={"help": "which targets are MLP layers (scaled on their input); null = PEFT's choice"}
    )


class IA3(PeftMethod):
    """(IA)³: learned rescaling vectors on keys, values and MLP activations (fewest parameters)."""

    Config = IA3Config
    quantizations = QUANTIZATIONS

    def peft_config(self, model: nn.Module) -> peft.IA3Config:
        c = self.config
        return peft.IA3Config(
            task_type=peft.TaskType.CAUSAL_LM,
            target_modules=module_names(c.target_modules),
            feedforward_modules=module_names(c.feedforward_modules),
        )
