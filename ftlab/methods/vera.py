"""VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by every layer; each
layer learns only two scaling vectors, so the adapter is tiny."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod, module_names


@dataclass
class VeraConfig(MethodConfig):
    lr: float = field(default=4e-3, metadata={"help": "learning rate (VeRA's vectors want ~10x LoRA's)"})
    r: int = field(default=256, metadata={"help": "rank of the shared random matrices (costs no trainable parameters)",
                                                         "min": 1})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input", "min": 0, "lt": 1})
    d_initial: float = field(default=0.1, metadata={"help": "initial value of the scaling vector d"})
    target_modules: Any = field(default="all-linear", metadata={"help": "'all-linear' or a list of module names"})
    seed: int = field(default=0, metadata={"help": "seed of the shared random matrices (saved with the adapter)"})


class Vera(PeftMethod):
    """VeRA: shared frozen random matrices, per-layer trained scaling vectors."""

    Config = VeraConfig
    quantizations = QUANTIZATIONS

    def peft_config(self, model: nn.Module) -> peft.VeraConfig:
        c = self.config
        return peft.VeraConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=c.r, vera_dropout=c.dropout, d_initial=c.d_initial,
            target_modules=module_names(c.target_modules), projection_prng_key=c.seed, save_projection=True,
        )
