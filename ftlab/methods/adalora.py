"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves, during training, to
the layers where it matters most. The budget is re-allocated after every optimizer step through
the ``on_step_end`` hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import peft
import torch
from torch import nn

from ftlab.errors import ConfigError
from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.lm_loss import causal_lm_loss
from ftlab.methods.peft_base import PeftMethod, module_names


@dataclass
class AdaLoraConfig(MethodConfig):
    lr: float = field(default=5e-4, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    init_r: int = field(default=12, metadata={"help": "rank every layer starts with", "min": 1})
    target_r: int = field(default=8, metadata={"help": "average rank per layer once the budget has shrunk", "min": 1})
    alpha: int = field(default=32, metadata={"help": "scaling numerator of the update", "gt": 0})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input", "min": 0, "lt": 1})
    target_modules: Any = field(default="all-linear", metadata={"help": "'all-linear' or a list of module names"})
    total_step: int = field(
        default="${trainer.max_steps}",  # type: ignore[assignment]  # resolved by OmegaConf
        metadata={"help": "steps of the run, which the budget schedule spans (follows trainer.max_steps)"},
    )
    init_ratio: float = field(default=0.1, metadata={"help": "share of the steps trained at init_r before ranks shrink",
                                                                "min": 0, "max": 1})
    final_ratio: float = field(default=0.3, metadata={"help": "share of the last steps trained at the final ranks",
                                                                 "min": 0, "max": 1})
    delta_t: int = field(default=1, metadata={"help": "steps between two budget re-allocations", "min": 1})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "weight of the orthogonality regulariser in the loss", "min": 0})


class AdaLora(PeftMethod):
    """AdaLoRA: SVD-form LoRA whose rank budget is re-allocated to the most important layers."""

    Config = AdaLoraConfig
    quantizations = QUANTIZATIONS

    def peft_config(self, model: nn.Module) -> peft.AdaLoraConfig:
        c = self.config
        if int(c.total_step) < 1:
            raise ConfigError(f"method.total_step={c.total_step}: AdaLoRA needs the run's length in steps (trainer.max_steps > 0)")
        if not (0 <= c.init_ratio and 0 <= c.final_ratio and c.init_ratio + c.final_ratio < 1):
            raise ConfigError(
                f"method.init_ratio={c.init_ratio} and method.final_ratio={c.final_ratio} must be >= 0 and sum "
                "to less than 1, leaving steps in which the budget shrinks"
            )
        if c.target_r > c.init_r:
            raise ConfigError(f"method.target_r={c.target_r} must not exceed method.init_r={c.init_r}")
        total = int(c.total_step)
        return peft.AdaLoraConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            init_r=c.init_r,
            target_r=c.target_r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=module_names(c.target_modules),
            total_step=total,
            tinit=int(c.init_ratio * total),
            tfinal=int(c.final_ratio * total),
            deltaT=c.delta_t,
            orth_reg_weight=c.orth_reg_weight,
        )

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        # PEFT's AdaLoRA layers on a 4/8-bit base leave ``ranknum`` trainable: the rank each update
        # is divided by, fixed at r (and never saved); training it rescales the update behind the
        # rank budget's back
        for name, param in model.named_parameters():
            if ".ranknum." in name:
                param.requires_grad_(False)
        return model

    def on_step_end(self, model: nn.Module, global_step: int) -> None:
        """Score each singular value by its gradient-weighted importance and mask the least
        important ones; gradients are still there (the module zeroes them before the next step)."""
        model.base_model.update_and_allocate(global_step)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Training: the LM loss plus PEFT's orthogonality regulariser (added by PEFT's forward when
        it gets labels, so all logits are computed). Validation: the LM loss alone, so val/loss
        compares with every other method's."""
        if model.training:
            return model(**self.model_inputs(batch)).loss
        return causal_lm_loss(model.base_model.model, self.model_inputs(batch))
