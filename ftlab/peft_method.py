"""Base for methods that are a PEFT tuner: one ``peft_config`` away from a working method.

PEFT injects the layers (``get_peft_model``), saves only what trained
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with plain
``PeftModel.from_pretrained``) and, for weight-space tuners, folds them back into the base
(``merge_and_unload``). A subclass returns its ``peft.PeftConfig``; everything else is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import peft
from torch import nn

from ftlab.method import BaseMethod


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
        return peft.get_peft_model(model, self.peft_config(model))

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        return peft.PeftModel.from_pretrained(base, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        super().merge(model)  # refuses with the reason when ``cannot_merge`` says why
        return model.merge_and_unload()
