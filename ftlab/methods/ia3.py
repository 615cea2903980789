"""(IA)³ (Liu et al. 2022): learn vectors that rescale keys, values and the MLP's activations.

With ``method.target_modules`` null, PEFT picks the layers for the model types it knows (Llama's
``k_proj``, ``v_proj``, ``down_proj``). For the others (MPT, Phi-3, OLMo, StarCoder2, ...) the same
choice is found from the model itself (``default_targets``): in each decoder block, the keys and
values (``k_proj`` and ``v_proj``; the fused ``qkv_proj``/``Wqkv``/``query_key_value`` when the
attention has no separate ones) and the MLP's output projection, the linear layer outside the
attention that maps back to the model width (``down_proj``, ``c_proj``, ``fc2``), which is also
the feed-forward module (scaled on its input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import peft
from torch import nn

from ftlab.errors import ModelStructureError
from ftlab.methods.base import QUANTIZATIONS, MethodConfig
from ftlab.methods.peft_base import PeftMethod, matches_target, module_names

if TYPE_CHECKING:
    from ftlab.models.architecture import Architecture

__all__ = ["IA3", "IA3Config", "default_targets"]

# a block-relative layer name's last part that is the keys / the values of the attention
_KEYS = re.compile(r"^(k|key|k_proj|key_proj|wk)$", re.IGNORECASE)
_VALUES = re.compile(r"^(v|value|v_proj|value_proj|wv)$", re.IGNORECASE)
# one layer computing queries, keys and values (Phi-3's qkv_proj, MPT's Wqkv, GPT-2's c_attn,
# Falcon/Bloom/GPT-NeoX's query_key_value), or keys and values (kv_proj)
_FUSED = re.compile(r"qkv|query_key_value|^c_attn$|^kv_proj$|^wkv$", re.IGNORECASE)


@dataclass
class IA3Config(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate ((IA)³ wants ~10x LoRA's)"})
    target_modules: Optional[Any] = field(
        default=None,
        metadata={"help": "modules to rescale; null = PEFT's choice for the architecture (keys, values, MLP down "
                          "projection), found from the model where PEFT has none"},
    )
    feedforward_modules: Optional[Any] = field(
        default=None,
        metadata={"help": "which targets are MLP layers (scaled on their input); null = PEFT's choice, or the MLP's "
                          "down projection among the targets where PEFT has none"},
    )


def _peft_knows(model_type: str) -> bool:
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING

    return model_type in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(target_modules, feedforward_modules)`` in PEFT's spirit, found from the model's own
    structure (names relative to a block, as PEFT matches them: ``attn.Wqkv``, ``ffn.down_proj``):
    the attention's keys and values (or its fused projection holding them) and the MLP's output
    projection, which is the feed-forward module. Raises ``ModelStructureError`` saying which
    part was not found."""
    from ftlab.models.structure import (attention_name, decoder_blocks, input_embeddings, linear_features,
                                        linear_layer_names)

    block = decoder_blocks(model)[0]
    attention = attention_name(block)
    linears = linear_layer_names(model)
    inside = [n for n in linears if n.startswith(attention + ".")]
    leaf = {n: n.rsplit(".", 1)[-1] for n in inside}
    keys = [n for n in inside if _KEYS.match(leaf[n])]
    values = [n for n in inside if _VALUES.match(leaf[n])]
    if keys and values:
        kv = keys + values
    else:
        kv = [n for n in inside if _FUSED.search(leaf[n])]
    if not kv:
        raise ModelStructureError(
            f"no key and value projections (k_proj/v_proj, or a fused qkv layer) among the linear layers of "
            f"{type(block).__name__}'s attention ({', '.join(inside) or 'none'})"
        )
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(width, int):
        width = int(input_embeddings(model).weight.shape[-1])
    modules = dict(block.named_modules())
    outside = [n for n in linears if not n.startswith(attention + ".") and n in modules]
    down = [n for n in outside if (w := linear_features(modules[n])) is not None and w[1] == width and w[0] != width]
    if not down:
        raise ModelStructureError(
            f"no MLP output projection (a linear layer outside the attention from a wider layer back to the model "
            f"width {width}) among the linear layers of {type(block).__name__} ({', '.join(outside) or 'none'})"
        )
    return kv + down[-1:], down[-1:]


class IA3(PeftMethod):
    """(IA)³: learned rescaling vectors on keys, values and MLP activations (fewest parameters)."""

    Config = IA3Config
    quantizations = QUANTIZATIONS

    @classmethod
    def refuse_model(cls, arch: Architecture, cfg: Any) -> str | None:
        method = cfg.method
        targets, feedforward = method.get("target_modules"), method.get("feedforward_modules")
        if _peft_knows(arch.model_type) or (targets is not None and feedforward is not None):
            return super().refuse_model(arch, cfg)
        if isinstance(targets, str):
            return (f"PEFT has no default (IA)³ feed-forward layers for {arch.model_type}, and which of "
                    f"method.target_modules={targets!r} are MLP layers cannot be told from a pattern; "
                    "set method.feedforward_modules=[...] too")
        try:
            default_targets(arch.skeleton)
        except ModelStructureError as err:
            return (f"PEFT has no default (IA)³ layers for {arch.model_type}, and its structure gives none: {err}; "
                    "set method.target_modules=[...] (keys, values, MLP down projection) and "
                    "method.feedforward_modules=[...] (the MLP ones)")
        return super().refuse_model(arch, cfg)

    def peft_config(self, model: nn.Module) -> peft.IA3Config:
        c = self.config
        targets, feedforward = module_names(c.target_modules), module_names(c.feedforward_modules)
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        if not _peft_knows(model_type) and (targets is None or (feedforward is None and isinstance(targets, list))):
            derived, derived_ff = default_targets(model)
            if targets is None:
                if feedforward is None:
                    targets, feedforward = derived, derived_ff
                elif isinstance(feedforward, list):  # the user's MLP layers replace the derived one
                    kv = [t for t in derived if t not in derived_ff]
                    targets = kv + [f for f in feedforward if f not in kv]
                else:
                    targets = derived
            else:  # the user's layers; the MLP ones among them are those naming the MLP's output projection
                feedforward = [t for t in targets if any(matches_target(d, t) for d in derived_ff)]
        return peft.IA3Config(
            task_type=peft.TaskType.CAUSAL_LM,
            target_modules=targets,
            feedforward_modules=feedforward,
        )
