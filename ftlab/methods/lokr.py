"""LoKr (LyCORIS): the update is a Kronecker product of a small matrix and a low-rank one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from ftlab.methods.base import MethodConfig
from ftlab.methods.peft_base import PeftMethod, module_names


@dataclass
class LoKrConfig(MethodConfig):
    lr: float = field(default=5e-4, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    r: int = field(default=8, metadata={"help": "rank of the low-rank Kronecker factor", "min": 1})
    alpha: int = field(default=8, metadata={"help": "scaling numerator: the update is scaled by alpha/r", "gt": 0})
    decompose_both: bool = field(default=False, metadata={"help": "also factor the small Kronecker matrix"})
    decompose_factor: int = field(default=-1, metadata={"help": "size of the small factor; -1 = as square as possible",
                                                                    "min": 1, "also": {-1: "as square as possible"}})
    rank_dropout: float = field(default=0.0, metadata={"help": "dropout over the rank dimension", "min": 0, "lt": 1})
    module_dropout: float = field(default=0.0, metadata={"help": "probability of skipping the whole update", "min": 0, "lt": 1})
    target_modules: Any = field(default="all-linear", metadata={"help": "'all-linear' or a list of module names"})


class LoKr(PeftMethod):
    """LoKr: Kronecker product of a small matrix and a low-rank one (LyCORIS)."""

    Config = LoKrConfig
    no_conv1d = "LoKr"  # its layers: Linear, Conv1d, Conv2d; GPT-2 (quantization=none) is refused before load
    quantizations = ("none", "int8")  # 4-bit: PEFT's LyCORIS layers misread packed Linear4bit weights

    def peft_config(self, model: nn.Module) -> peft.LoKrConfig:
        c = self.config
        return peft.LoKrConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=c.r, alpha=c.alpha, decompose_both=c.decompose_both,
            decompose_factor=c.decompose_factor, rank_dropout=c.rank_dropout, module_dropout=c.module_dropout,
            target_modules=module_names(c.target_modules),
        )
