"""Transfer learning: freeze the pretrained model except its last N blocks and chosen modules.

The blocks and the final norm are found from the model (``ftlab.models.structure``), so the
defaults work on any decoder architecture, not only on Llama's ``model.layers``/``model.norm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ftlab.evaluation.classification import is_classifier
from ftlab.errors import ConfigError
from ftlab.methods.base import BaseMethod, MethodConfig
from ftlab.models.structure import decoder_blocks, final_norm

FINAL_NORM = "final_norm"  # the entry of ``modules`` that names the final norm, whatever it is called


@dataclass
class FreezeConfig(MethodConfig):
    lr: float = field(default=1e-4, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    last_n_blocks: int = field(default=2, metadata={"help": "how many of the last transformer blocks train (0 = none)",
                                                                "min": 0})
    modules: list[str] = field(
        default_factory=lambda: [FINAL_NORM],
        metadata={"help": f"modules that also train: '{FINAL_NORM}' (the norm after the last block, found from the "
                          "model: model.norm on Llama, transformer.ln_f on GPT-2) or regexes of module names "
                          "(fully matched, e.g. 'model.norm', 'lm_head')"},
    )


class Freeze(BaseMethod):
    """Freeze everything, then unfreeze the last ``last_n_blocks`` blocks and the named modules.

    On a classification model the new head always trains, so ``last_n_blocks=0 modules=[]`` is
    the classic linear probe: a linear classifier on the frozen pretrained features."""

    Config = FreezeConfig
    trains_base = True

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        model.requires_grad_(False)
        blocks = decoder_blocks(model)
        if not 0 <= cfg.last_n_blocks <= len(blocks):
            raise ConfigError(f"method.last_n_blocks={cfg.last_n_blocks} must be between 0 and {len(blocks)}")
        for block in list(blocks)[len(blocks) - cfg.last_n_blocks:]:
            block.requires_grad_(True)
        if FINAL_NORM in cfg.modules:
            final_norm(model).requires_grad_(True)
        patterns = [re.compile(p) for p in cfg.modules if p != FINAL_NORM]
        matched = {p.pattern: False for p in patterns}
        for name, module in model.named_modules():
            for p in patterns:
                if p.fullmatch(name):
                    module.requires_grad_(True)
                    matched[p.pattern] = True
        head = getattr(model, "score", None) if is_classifier(model) else None
        if head is not None:  # a new classification head is random: it always trains
            head.requires_grad_(True)
        missing = [p for p, hit in matched.items() if not hit]
        if missing:
            raise ConfigError(f"method.modules: no module of {type(model).__name__} matches {missing}")
        return model
