"""OFT (Qiu et al. 2023): multiply each weight by a learned block-diagonal orthogonal matrix,
which keeps the angles between neurons (the "hyperspherical energy") of the pretrained model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod, module_names


@dataclass
class OftConfig(MethodConfig):
    lr: float = field(default=5e-4, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    block_size: int = field(default=32, metadata={"help": "size of each orthogonal block (must divide the layer's input size)",
                                                               "min": 1})
    coft: bool = field(default=False, metadata={"help": "constrained OFT: keep the rotation within eps of identity"})
    eps: float = field(default=6e-5, metadata={"help": "the COFT constraint (coft=true)", "gt": 0})
    block_share: bool = field(default=False, metadata={"help": "share one block across each layer"})
    module_dropout: float = field(default=0.0, metadata={"help": "probability of skipping a block's rotation", "min": 0, "lt": 1})
    target_modules: Any = field(default="all-linear", metadata={"help": "'all-linear' or a list of module names"})


class Oft(PeftMethod):
    """OFT: learned block-diagonal orthogonal rotation of each weight."""

    Config = OftConfig
    no_conv1d = "OFT"  # its layers: Linear, Conv2d, Embedding; GPT-2 (quantization=none) is refused before load
    quantizations = QUANTIZATIONS

    def peft_config(self, model: nn.Module) -> peft.OFTConfig:
        c = self.config
        return peft.OFTConfig(
            task_type=peft.TaskType.CAUSAL_LM, r=0, oft_block_size=c.block_size, coft=c.coft, eps=c.eps,
            block_share=c.block_share, module_dropout=c.module_dropout, target_modules=module_names(c.target_modules),
        )
