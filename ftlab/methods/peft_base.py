"""Base for methods that are a PEFT tuner: one ``peft_config`` away from a working method.

PEFT injects the layers (``get_peft_model``), saves only what trained
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with plain
``PeftModel.from_pretrained``) and, for weight-space tuners, folds them back into the base
(``merge_and_unload``). A subclass returns its ``peft.PeftConfig``; everything else is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import peft
from torch import nn

from ftlab.evaluation.classification import is_classifier
from ftlab.methods.base import BaseMethod


__all__ = ["PeftMethod", "is_quantized", "merge_dequantized", "module_names"]


def module_names(value: Any) -> Any:
    """A config's module-name list as PEFT wants it: a plain list (OmegaConf gives ListConfig),
    or a string (``"all-linear"``, a regex) or None (PEFT's per-architecture default) as is."""
    return value if value is None or isinstance(value, str) else list(value)


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


class PeftMethod(BaseMethod):
    """A method whose model is ``peft.get_peft_model(base, self.peft_config(base))``."""

    artifact: ClassVar[str] = "adapter"

    def peft_config(self, model: nn.Module) -> peft.PeftConfig:
        """The PEFT config built from ``self.config`` (``model`` is the base, for tuners that
        need its sizes or tokenizer-dependent settings)."""
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        if is_quantized(model):
            # casts norms to fp32 and makes the input embeddings require grad for checkpointing
            checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        config = self.peft_config(model)
        if is_classifier(model):
            # PEFT then wraps it as a sequence classifier and trains and saves the new head (score)
            config.task_type = peft.TaskType.SEQ_CLS
        return peft.get_peft_model(model, config)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        return peft.PeftModel.from_pretrained(base, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        super().merge(model)  # refuses with the reason when ``cannot_merge`` says why
        if is_quantized(model.get_base_model()):
            return merge_dequantized(model)
        return model.merge_and_unload()


def merge_dequantized(model: peft.PeftModel) -> nn.Module:
    """Fold the adapter into a dequantized copy of a 4/8-bit base.

    Merging into the quantized weights (PEFT's ``merge_and_unload`` on bitsandbytes layers)
    re-quantizes them and rounds most of a small update away. Instead: keep the adapter's
    weights, take the base out (``unload``), dequantize it to its compute dtype, put the same
    adapter back and merge in full precision: the result computes what the quantized model did.
    """
    config = model.peft_config[model.active_adapter]
    state = peft.get_peft_model_state_dict(model)
    inner = model.get_base_model()
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(inner, flag):  # cleared first: PEFT's IA3 refuses even to unload a model flagged so
            setattr(inner, flag, False)
    base = model.unload().dequantize()
    restored = peft.get_peft_model(base, config)
    result = peft.set_peft_model_state_dict(restored, state)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter weights did not fit the dequantized base: {result.unexpected_keys[:3]}")
    return restored.merge_and_unload()
