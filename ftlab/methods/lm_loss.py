"""The causal LM loss from the logits of labelled positions only.

Why: in instruction data most tokens are prompt, labelled -100 (on ftlab's default data 10% of
the real tokens are targets), yet a causal LM's forward projects every position onto the
vocabulary. For SmolLM2-135M that head (576 x 49,152) is about a fifth of the matmul FLOPs of a
token, and its float32 logits (batch x length x 49,152 x 4 bytes, and as much again for their
gradient) are the largest activation of a step. transformers' ``logits_to_keep`` takes a boolean
(batch, length) mask: the head then runs on the kept positions only, after the model's own
final-logit processing (Gemma-2's soft-capping, Granite's scaling) as usual. The loss is the
same number as ``model(**batch).loss``, the mean cross-entropy over labelled targets.

It is used where it is exact: a model whose causal-LM forward slices with
``slice_logits_to_keep`` (every family of ftlab's support matrix), no PEFT prompt learning (its
virtual tokens shift the positions) and no mixture-of-experts auxiliary loss (added to the loss
only when labels are passed). Anything else takes ``model(**batch).loss``.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, targets)``: the (batch, length) mask of positions whose next token is labelled,
    and those next tokens in the mask's row-major order (the order of ``hidden[keep]``)."""
    following = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = following != IGNORE_INDEX
    return keep, following[keep[:, :-1]]


@lru_cache(maxsize=None)
def _slices_logits(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "slice_logits_to_keep(" in source and "logits_to_keep" in inspect.signature(cls.forward).parameters


def keeps_labelled_logits(model: nn.Module) -> bool:
    """Whether ``causal_lm_loss`` can ask ``model`` for the labelled positions' logits alone."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, Mapping):
        active = getattr(model, "active_adapter", None)
        config = peft_config.get(active) if isinstance(active, str) else None
        if config is None or getattr(config, "is_prompt_learning", False):
            return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(inner, "config", None), "output_router_logits", False):
        return False
    return _slices_logits(type(inner))


def causal_lm_loss(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``model(**inputs).loss``, with the LM head run on labelled positions only where that is exact."""
    labels = inputs.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or not keeps_labelled_logits(model):
        return model(**inputs).loss
    keep, targets = target_positions(labels)
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**rest, logits_to_keep=keep).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets)
