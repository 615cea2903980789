"""LoRA through PEFT, and QLoRA: the same adapter on a 4-bit NF4 base (the QLoRA paper's recipe)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import peft
import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod, fused_parameter_targets, may_fuse_targets, module_names

if TYPE_CHECKING:
    from ftlab.models.architecture import Architecture

log = logging.getLogger(__name__)

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

    @classmethod
    def refuse_model(cls, arch: Architecture, cfg: Any) -> str | None:
        """On a transformers-5 MoE (Mixtral), whose experts and router ``all-linear`` selects as
        parameters (``fused_parameter_targets``): DoRA, which PEFT's ``ParamWrapper`` has not,
        and target names PEFT cannot map onto the fused experts (``w1`` without ``w3``)."""
        method = cfg.method
        if method.get("adapter", "lora") == "none" or not may_fuse_targets(arch.model_type):
            return None  # a pair method training every weight; a model without fused experts
        try:
            config = lora_config(method)
        except (AttributeError, ValueError):  # a plugin's config of other fields; PEFT's own error at apply
            return None
        try:
            fused = fused_parameter_targets(config, arch.skeleton)
        except ValueError as err:  # PEFT cannot map the names onto the fused experts (w1 without w3)
            return (f"PEFT cannot map method.target_modules={_shown(method.get('target_modules'))} onto the fused MoE "
                    f"weights of {arch.class_name}: {' '.join(str(err).split())}")
        if not fused or not method.get("dora"):
            return None
        from ftlab.models.structure import linear_layer_names

        return (f"PEFT's DoRA has no layer for the MoE expert and router weights of {arch.class_name} "
                f"({', '.join(fused)}: parameters, not linear layers, in transformers 5), which method.target_modules="
                f"{_shown(method.get('target_modules'))} selects; set "
                f"method.target_modules=[{','.join(linear_layer_names(arch.skeleton))}], or method.dora=false")

    def peft_config(self, model: nn.Module) -> peft.LoraConfig:
        config = lora_config(self.config)
        self._module_dropout = 0.0
        if config.lora_dropout and fused_parameter_targets(config, model):
            # PEFT adapts a transformers-5 MoE's fused experts as parameters (a ParamWrapper), which
            # cannot take dropout (lora_B(lora_A(dropout(x))) has no x to drop there); the linear
            # layers get it after injection (``apply``), the saved config says 0 so PEFT reloads it
            self._module_dropout = config.lora_dropout
            config.lora_dropout = 0.0
        return config

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        dropout = getattr(self, "_module_dropout", 0.0)
        if dropout:
            from peft.tuners.lora import LoraLayer
            from peft.tuners.lora.layer import ParamWrapper

            fused = []
            for name, module in model.named_modules():
                if isinstance(module, ParamWrapper):
                    fused.append(name)
                elif isinstance(module, LoraLayer):
                    for adapter in module.lora_dropout:
                        module.lora_dropout[adapter] = nn.Dropout(p=dropout)
            log.info("method.dropout=%s applies to the LoRA layers on linear modules; the %d fused expert/router "
                     "weights PEFT adapts as parameters take none", dropout, len(fused))
        return model

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


def lora_config(c: Any) -> peft.LoraConfig:
    """The PEFT config of a LoRA method config (``Lora.Config`` or its composed ``cfg.method`` node)."""
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


def _shown(value: Any) -> str:
    if value is None or isinstance(value, str):
        return "null" if value is None else value
    return f"[{','.join(map(str, value))}]"


class QLora(Lora):
    """LoRA on a quantized base; selects quantization=nf4 and paged 8-bit AdamW by default."""

    quantizations = ("nf4", "fp4", "int8")
    defaults = [
        {"override /quantization@_global_.quantization": "nf4"},
        {"override /optimizer@_global_.optimizer": "paged_adamw_8bit"},
    ]
