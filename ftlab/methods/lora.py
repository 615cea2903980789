"""LoRA through PEFT, and QLoRA: the same adapter on a 4-bit NF4 base (the QLoRA paper's recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import peft
from torch import nn

from ftlab.method import QUANTIZATIONS, MethodConfig
from ftlab.peft_method import PeftMethod, module_names


@dataclass
class LoraConfig(MethodConfig):
    r: int = field(default=16, metadata={"help": "rank of the low-rank update"})
    alpha: int = field(default=32, metadata={"help": "scaling numerator: the update is scaled by alpha/r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    target_modules: Any = field(
        default="all-linear", metadata={"help": "'all-linear', or a list of module names (e.g. [q_proj, v_proj])"}
    )
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})
    dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    bias: str = field(default="none", metadata={"help": "which biases train: none, all, lora_only"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "extra modules trained in full and saved with the adapter"}
    )
    plus_ratio: float = field(
        default=1.0, metadata={"help": "LoRA+: B matrices train at lr * plus_ratio (the paper suggests 16; 1 = plain LoRA)"}
    )


class Lora(PeftMethod):
    """LoRA: trained low-rank updates B·A beside frozen weights; DoRA, rsLoRA and LoRA+ switches."""

    Config = LoraConfig
    quantizations = QUANTIZATIONS

    def peft_config(self, model: nn.Module) -> peft.LoraConfig:
        c = self.config
        return peft.LoraConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=module_names(c.target_modules),
            use_rslora=c.rslora,
            use_dora=c.dora,
            bias=c.bias,
            modules_to_save=list(c.modules_to_save) if c.modules_to_save else None,
        )


    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """LoRA+ (Hayou et al. 2024): B learns faster than A, by ``plus_ratio``."""
        if self.config.plus_ratio == 1.0:
            return super().parameter_groups(model, lr)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fast = [p for n, p in trainable if "lora_B" in n or "lora_embedding_B" in n]
        rest = [p for n, p in trainable if not ("lora_B" in n or "lora_embedding_B" in n)]
        return [{"params": rest, "lr": lr}, {"params": fast, "lr": lr * self.config.plus_ratio}]


class QLora(Lora):
    """LoRA on a quantized base; selects quantization=nf4 and paged 8-bit AdamW by default."""

    quantizations = ("nf4", "fp4", "int8")
    defaults = [
        {"override /quantization@_global_.quantization": "nf4"},
        {"override /optimizer@_global_.optimizer": "paged_adamw_8bit"},
    ]
