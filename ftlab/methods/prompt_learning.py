"""Shared base of the prompt-learning methods (prompt, prefix, p-tuning, multitask prompt).

They leave every weight of the base model untouched and learn extra inputs instead: virtual
token embeddings, or key/value prefixes for every layer. That is why they train on any base,
quantized ones included, and why there is nothing to merge into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod


@dataclass
class PromptLearningConfig(MethodConfig):
    lr: float = field(default=3e-2, metadata={"help": "learning rate (prompt methods want 1e-2..3e-1)"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "how many virtual tokens are learnt", "min": 1})


class PromptLearningMethod(PeftMethod):
    """A PEFT prompt-learning tuner: trains on any base, cannot be merged."""

    quantizations = QUANTIZATIONS
    cannot_merge = (
        "it learns virtual tokens fed to the model with every input, not a change of the weights; "
        "export it as an adapter and load it with peft.PeftModel.from_pretrained"
    )
    no_packing = "PEFT prepends its virtual tokens through the attention mask, which packed batches do not have"
