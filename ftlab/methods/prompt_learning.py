"""Shared base of the prompt-learning methods (prompt, prefix, p-tuning, multitask prompt).

They leave every weight of the base model untouched and learn extra inputs instead: virtual
token embeddings, or key/value prefixes for every layer. That is why they train on any base,
quantized ones included, and why there is nothing to merge into the weights.

PEFT reads the sizes it needs (``token_dim``, ``num_layers``, ``num_attention_heads``) from the
model config's dict under the names most families use (``hidden_size``/``n_embd``/``d_model``,
``num_attention_heads``/``n_head``); MPT calls its heads ``n_heads``, which PEFT does not look
for. ``model_sizes`` gives them from the model itself instead: the input embeddings' width (what
a virtual token must have), the config's own ``num_hidden_layers``/``num_attention_heads``
(transformers' attribute maps reach MPT's ``n_layers``/``n_heads``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod

__all__ = ["PromptLearningConfig", "PromptLearningMethod", "config_size"]


@dataclass
class PromptLearningConfig(MethodConfig):
    lr: float = field(default=3e-2, metadata={"help": "learning rate (prompt methods want 1e-2..3e-1)"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "how many virtual tokens are learnt", "min": 1})


def config_size(model: nn.Module, name: str) -> int | None:
    """``model.config.<name>`` when it is a positive int (through the config's attribute map:
    ``num_attention_heads`` is MPT's ``n_heads``), else None."""
    value = getattr(getattr(model, "config", None), name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class PromptLearningMethod(PeftMethod):
    """A PEFT prompt-learning tuner: trains on any base, cannot be merged."""

    quantizations = QUANTIZATIONS
    cannot_merge = (
        "it learns virtual tokens fed to the model with every input, not a change of the weights; "
        "export it as an adapter and load it with peft.PeftModel.from_pretrained"
    )
    no_packing = "PEFT prepends its virtual tokens through the attention mask, which packed batches do not have"

    def model_sizes(self, model: nn.Module) -> dict[str, Any]:
        """The sizes PEFT's prompt-learning config needs, from ``model``: ``token_dim`` (the input
        embeddings' width: a virtual token is one more embedding), ``num_layers`` and
        ``num_attention_heads`` (the config's, or the number of decoder blocks). A size not found
        is left out (None: PEFT then looks for it itself)."""
        from ftlab.models.structure import decoder_blocks, input_embeddings

        weight = getattr(input_embeddings(model), "weight", None)
        layers = config_size(model, "num_hidden_layers") or len(decoder_blocks(model))
        sizes = {
            "token_dim": int(weight.shape[-1]) if weight is not None and weight.dim() == 2 else None,
            "num_layers": layers,
            "num_attention_heads": config_size(model, "num_attention_heads"),
        }
        return {k: v for k, v in sizes.items() if v is not None}
