"""LN tuning (Zhao et al. 2023): train only the normalisation layers; a strong baseline with
a few thousand parameters.

With ``method.target_modules`` null, PEFT picks the norms for the model types it knows. For the
others (GPT-NeoX, OPT, MPT, Phi-3, Mixtral, ...) they are found from the model itself
(``default_targets``): every norm layer inside the decoder blocks that has weights, and the
final norm. OLMo's layer norms have no weights at all: that model is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import peft
from torch import nn

from ftlab.errors import ModelStructureError
from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod, matches_target, module_names

if TYPE_CHECKING:
    from ftlab.models.architecture import Architecture

__all__ = ["LnTuning", "LnTuningConfig", "default_targets"]


@dataclass
class LnTuningConfig(MethodConfig):
    lr: float = field(default=1e-3, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    target_modules: Any = field(
        default=None,
        metadata={"help": "norm layers to train; null = PEFT's choice for the architecture, or the blocks' norms and "
                          "the final norm where PEFT has none"},
    )


def _peft_knows(model_type: str) -> bool:
    from peft.utils import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING

    return model_type in TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def default_targets(model: nn.Module) -> list[str]:
    """The norm layers LN tuning trains, found from the model's own structure: the norms of the
    decoder blocks that have weights (names relative to a block, as PEFT matches them:
    ``input_layernorm``, ``norm_1``) and the final norm (its qualified name, ``model.norm``,
    ``transformer.norm_f``, unless a block norm's name already matches it). Raises
    ``ModelStructureError`` when no norm with weights is found."""
    from ftlab.models.structure import decoder_blocks, final_norm, module_name, norm_layer_names

    block = decoder_blocks(model)[0]
    names = norm_layer_names(model)
    targets = [n for n in names if _has_weights(block.get_submodule(n))]
    try:
        final = final_norm(model)
    except ModelStructureError:
        final = None
    if final is not None and _has_weights(final):
        qualified = module_name(model, final)
        if not any(matches_target(qualified, t) for t in targets):
            targets.append(qualified)
    if not targets:
        found = [f"{n}: {type(block.get_submodule(n)).__name__}" for n in names]
        if final is not None:
            found.append(f"{module_name(model, final)}: {type(final).__name__}")
        raise ModelStructureError(f"no norm layer with weights ({', '.join(found) or 'no norm layer found'})")
    return targets


class LnTuning(PeftMethod):
    """LN tuning: only the normalisation layers train (copies of them, so the base is untouched)."""

    Config = LnTuningConfig
    quantizations = QUANTIZATIONS

    @classmethod
    def refuse_model(cls, arch: Architecture, cfg: Any) -> str | None:
        if cfg.method.get("target_modules") is None and not _peft_knows(arch.model_type):
            try:
                default_targets(arch.skeleton)
            except ModelStructureError as err:
                return (f"LN tuning trains the weights of norm layers, and {arch.class_name} has {err}; "
                        "use method=ia3 or method=lora")
        return super().refuse_model(arch, cfg)

    def peft_config(self, model: nn.Module) -> peft.LNTuningConfig:
        targets = module_names(self.config.target_modules)
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        if targets is None and not _peft_knows(model_type):
            targets = default_targets(model)
        return peft.LNTuningConfig(task_type=peft.TaskType.CAUSAL_LM, target_modules=targets)
