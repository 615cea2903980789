"""LoRA through PEFT, and QLoRA: the same adapter on a 4-bit NF4 base (the QLoRA paper's recipe)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import peft
import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod, module_names

LORA_B = re.compile(r"\.lora_(embedding_)?B\.")  # PEFT's names: ...q_proj.lora_B.default.weight


@dataclass
class LoraConfig(MethodConfig):
    r: int = field(default=16, metadata={"help": "rank of the low-rank update", "min": 1})
    alpha: int = field(default=32, metadata={"help": "scaling numerator: the update is scaled by alpha/r", "gt": 0})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input", "min": 0, "lt": 1})
    target_modules: Any = field(
        default="all-linear", metadata={"help": "'all-linear', or a list of module names (e.g. [q_proj, v_proj])"}
    )
    rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha/sqrt(r)"})
    dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    bias: str = field(default="none", metadata={"help": "which biases train: none, all, lora_only",
                                                  "choices": ["none", "all", "lora_only"]})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "extra modules trained in full and saved with the adapter"}
    )
    plus_ratio: float = field(
        default=1.0, metadata={"help": "LoRA+: B matrices train at lr * plus_ratio (the paper suggests 16; 1 = plain LoRA)",
                              "gt": 0}
    )


class Lora(PeftMethod):
    """LoRA: trained low-rank updates B·A beside frozen weights; DoRA, rsLoRA and LoRA+ switches."""

    Config = LoraConfig
    quantizations = QUANTIZATIONS

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        # PEFT's DoRA re-reads an int8 weight on every CPU forward and drops its scales on the way
        # (peft.utils.integrations.dequantize_module_weight): the second training step fails.
        if cfg.method.get("dora") and cfg.quantization.name == "int8" and not torch.cuda.is_available():
            raise ConfigError(
                "method.dora=true cannot train an int8 base on a CPU (PEFT's DoRA loses the int8 scales after "
                "the first step there); use quantization=nf4, fp4 or none, or a GPU"
            )

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
        """LoRA+ (Hayou et al. 2024): B starts at zero and, for wide layers, learns efficiently only
        at a higher rate than A; so B matrices (of linear and embedding layers) get ``lr * plus_ratio``."""
        ratio = self.config.plus_ratio
        if ratio == 1.0:
            return super().parameter_groups(model, lr)
        if ratio <= 0:
            raise ConfigError(f"method.plus_ratio={ratio} must be positive (1 turns LoRA+ off, 16 is the paper's)")
        slow: list[nn.Parameter] = []
        fast: list[nn.Parameter] = []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (fast if LORA_B.search(name) else slow).append(param)
        return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}]


class QLora(Lora):
    """LoRA on a quantized base; selects quantization=nf4 and paged 8-bit AdamW by default."""

    quantizations = ("nf4", "fp4", "int8")
    defaults = [
        {"override /quantization@_global_.quantization": "nf4"},
        {"override /optimizer@_global_.optimizer": "paged_adamw_8bit"},
    ]
