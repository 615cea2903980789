"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for LLMs").

LoRA with the down-projection A frozen at its random initialisation: only B trains, so the
optimizer holds state for half the adapter, and A's input activations need not be kept for
its gradient. The update B·A still spans a rank-r subspace chosen at random.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import peft
from torch import nn

from ftlab.method import MethodConfig
from ftlab.peft_method import PeftMethod

__version__ = "0.1.0"


@dataclass
class LoraFAConfig(MethodConfig):
    lr: float = field(default=5e-4, metadata={"help": "learning rate of B (only B trains)"})
    r: int = field(default=16, metadata={"help": "rank of the update B·A"})
    alpha: int = field(default=32, metadata={"help": "scaling numerator: the update is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    target_modules: str = field(default="all-linear", metadata={"help": "'all-linear' or a regex of module names"})


class LoraFA(PeftMethod):
    """LoRA with A frozen at its random init; only B trains (half the optimizer state)."""

    Config = LoraFAConfig
    quantizations = ("none", "nf4", "fp4", "int8")  # the base stays frozen, as in QLoRA

    def peft_config(self, model: nn.Module) -> peft.LoraConfig:
        c = self.config
        return peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
            target_modules=c.target_modules,
        )

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
        return model
