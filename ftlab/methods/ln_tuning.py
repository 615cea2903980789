"""LN tuning (Zhao et al. 2023): train only the normalisation layers; a strong baseline with
a few thousand parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod, module_names


@dataclass
class LnTuningConfig(MethodConfig):
    lr: float = field(default=1e-3, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    target_modules: Any = field(
        default=None, metadata={"help": "norm layers to train; null = PEFT's choice for the architecture (every RMSNorm)"}
    )


class LnTuning(PeftMethod):
    """LN tuning: only the normalisation layers train (copies of them, so the base is untouched)."""

    Config = LnTuningConfig
    quantizations = QUANTIZATIONS

    def peft_config(self, model: nn.Module) -> peft.LNTuningConfig:
        return peft.LNTuningConfig(task_type=peft.TaskType.CAUSAL_LM, target_modules=module_names(self.config.target_modules))
