"""Transfer learning: freeze the pretrained model except its last N blocks and chosen modules."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ftlab.evaluation.classification import is_classifier
from ftlab.errors import ConfigError
from ftlab.methods.base import BaseMethod, MethodConfig


@dataclass
class FreezeConfig(MethodConfig):
    lr: float = field(default=1e-4, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    last_n_blocks: int = field(default=2, metadata={"help": "how many of the last transformer blocks train (0 = none)"})
    modules: list[str] = field(
        default_factory=lambda: ["model.norm"],
        metadata={"help": "regexes of module names that also train (fully matched, e.g. 'model.norm', 'lm_head')"},
    )


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: its longest ModuleList (``model.layers`` for Llama)."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no ModuleList of transformer blocks to unfreeze")
    return max(lists, key=lambda item: len(item[1]))


class Freeze(BaseMethod):
    """Freeze everything, then unfreeze the last ``last_n_blocks`` blocks and the named modules.

    On a classification model the new head always trains, so ``last_n_blocks=0 modules=[]`` is
    the classic linear probe: a linear classifier on the frozen pretrained features."""

    Config = FreezeConfig
    trains_base = True

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        model.requires_grad_(False)
        _, blocks = decoder_blocks(model)
        if not 0 <= cfg.last_n_blocks <= len(blocks):
            raise ConfigError(f"method.last_n_blocks={cfg.last_n_blocks} must be between 0 and {len(blocks)}")
        for block in list(blocks)[len(blocks) - cfg.last_n_blocks:]:
            block.requires_grad_(True)
        patterns = [re.compile(p) for p in cfg.modules]
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
