"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): the update is the Hadamard product of two
low-rank products, reaching a higher rank than LoRA for the same parameter count."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from ftlab.methods.base import MethodConfig
from ftlab.methods.peft_base import PeftMethod, module_names


@dataclass
class LoHaConfig(MethodConfig):
    lr: float = field(default=5e-4, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    r: int = field(default=8, metadata={"help": "rank of each of the two low-rank factors", "min": 1})
    alpha: int = field(default=8, metadata={"help": "scaling numerator: the update is scaled by alpha/r", "gt": 0})
    rank_dropout: float = field(default=0.0, metadata={"help": "dropout over the rank dimension", "min": 0, "lt": 1})
    module_dropout: float = field(default=0.0, metadata={"help": "probability of skipping the whole update", "min": 0, "lt": 1})
    target_modules: Any = field(default="all-linear", metadata={"help": "'all-linear' or a list of module names"})


class LoHa(PeftMethod):
    """LoHa: Hadamard product of two low-rank updates (LyCORIS)."""

    Config = LoHaConfig
    no_conv1d = "LoHa"  # its layers: Linear, Conv1d, Conv2d; GPT-2 (quantization=none) is refused before load
    quantizations = ("none", "int8")  # 4-bit: PEFT's LyCORIS layers misread packed Linear4bit weights

    def peft_config(self, model: nn.Module) -> peft.LoHaConfig:
        c = self.config
        return peft.LoHaConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=c.r, alpha=c.alpha, rank_dropout=c.rank_dropout,
            module_dropout=c.module_dropout, target_modules=module_names(c.target_modules),
        )
