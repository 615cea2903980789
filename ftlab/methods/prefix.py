"""Prefix tuning (Li & Liang 2021): learn key/value prefixes for the attention of every layer.

PEFT hands the prefixes to the model as its key/value cache, so each must have the shape the
attention's cached keys have: as many key/value heads, of the same size. PEFT takes them from the
config (``num_attention_heads``, and ``num_key_value_heads`` whenever the config has that key),
which misleads it on a multi-query Falcon (one key/value head; its config says ``multi_query``),
on MPT (``n_heads``, a name PEFT does not read) and on a config with a ``num_key_value_heads`` its
architecture does not use (GPT-2, OPT, GPT-NeoX, Bloom keep one key/value head per query head;
ftlab's tiny models of those families carry such a key). So the layout is read from the model
itself (``ftlab.models.structure.kv_cache_layout``) and given to PEFT, and while PEFT builds or
loads the prefixes the config's ``num_key_value_heads`` shows that layout.

A model whose attention writes no key/value cache that way is refused before it loads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import peft
from torch import nn

from ftlab.errors import ModelStructureError
from ftlab.methods.prompt_learning import PromptLearningConfig, PromptLearningMethod

if TYPE_CHECKING:
    from ftlab.models.architecture import Architecture

__all__ = ["Prefix", "PrefixConfig"]


@dataclass
class PrefixConfig(PromptLearningConfig):
    lr: float = field(default=1e-2, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    projection: bool = field(
        default=False, metadata={"help": "reparameterise the prefixes through a 2-layer MLP (the paper's trick for stability)"}
    )
    encoder_hidden_size: int = field(default=512, metadata={"help": "hidden size of that MLP (projection=true)", "min": 1})


@contextmanager
def _config_shows_layout(model: nn.Module, heads: int, head_dim: int) -> Iterator[None]:
    """While PEFT sizes the prefixes: when the config's dict has ``num_key_value_heads`` (PEFT
    then takes the head count from it, and the head size from its ``head_dim`` if set, over the
    sizes passed), make them the ones the attention caches; put the config back after."""
    config = getattr(model, "config", None)
    seen = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    if "num_key_value_heads" not in seen:
        yield
        return
    changes = {"num_key_value_heads": heads} if seen["num_key_value_heads"] != heads else {}
    if seen.get("head_dim") is not None and seen["head_dim"] != head_dim:
        changes["head_dim"] = head_dim
    before = {name: getattr(config, name) for name in changes}
    for name, value in changes.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(config, name, value)


class Prefix(PromptLearningMethod):
    """Prefix tuning: trained key/value prefixes in every attention layer."""

    Config = PrefixConfig
    tasks = ("causal_lm",)  # PEFT's sequence classifier feeds prefixes as past key values, which it refuses for Llama

    @classmethod
    def refuse_model(cls, arch: Architecture, cfg: Any) -> str | None:
        from ftlab.models.structure import kv_cache_layout

        try:
            kv_cache_layout(arch.skeleton)
        except ModelStructureError as err:
            return (f"PEFT's prefix tuning feeds its prefixes to the attention as cached keys and values, and {err}; "
                    "use method=prompt or method=lora")
        return super().refuse_model(arch, cfg)

    def model_sizes(self, model: nn.Module) -> dict[str, Any]:
        """A prefix is one key and one value per layer, per virtual token, shaped like the cached
        ones: ``num_attention_heads`` is the number of key/value heads the attention caches and
        ``token_dim`` their total width (``ftlab.models.structure.kv_cache_layout``)."""
        from ftlab.models.structure import kv_cache_layout

        heads, head_dim = kv_cache_layout(model)
        return {**super().model_sizes(model), "num_attention_heads": heads, "token_dim": heads * head_dim}

    def peft_config(self, model: nn.Module) -> peft.PrefixTuningConfig:
        c = self.config
        return peft.PrefixTuningConfig(
            task_type=peft.TaskType.CAUSAL_LM,
            num_virtual_tokens=c.num_virtual_tokens,
            prefix_projection=c.projection,
            encoder_hidden_size=c.encoder_hidden_size,
            **self.model_sizes(model),
        )

    def apply(self, model: nn.Module) -> nn.Module:
        from ftlab.models.structure import kv_cache_layout

        with _config_shows_layout(model, *kv_cache_layout(model)):
            return super().apply(model)

    def load(self, base: nn.Module, directory: Path) -> nn.Module:
        from ftlab.models.structure import kv_cache_layout

        with _config_shows_layout(base, *kv_cache_layout(base)):
            return super().load(base, directory)
