"""Full fine-tuning: every weight of the base model trains."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ftlab.methods.base import BaseMethod, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    lr: float = field(default=5e-5, metadata={"help": "learning rate (full fine-tuning wants ~10x less than LoRA)"})


class Full(BaseMethod):
    """Train all parameters. Needs an unquantized base: 4-bit/8-bit weights cannot take gradients."""

    Config = FullConfig
    trains_base = True

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
