"""The causal-LM architecture families ftlab is tested on, and how to build a tiny one of each.

``model.family`` names one of them. ``model=tiny model.family=qwen2`` builds a random-init Qwen2
as small as the Llama ``model=tiny`` (hidden 64, 2 blocks, the shipped 1,000-token tokenizer), from
transformers' own config class for that family: the same modules, names and code paths as the
real checkpoints, in a few hundred KB. The ``model=<family>`` presets (``conf/model/*.yaml``) name
each family's hub checkpoint and chat template; this table holds what only code can say: the
transformers ``model_type`` and the config fields a family needs beyond the common tiny sizes
(a head dimension its default would make larger than the hidden size, an MoE's expert count).

Adding a family: an entry here, a preset YAML, and a run of the support matrix
(``python -m ftlab.models.support --write``, docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["FAMILIES", "Family", "family", "family_of_model_type"]


@dataclass(frozen=True)
class Family:
    """One architecture family: its transformers ``model_type`` and tiny-config extras."""

    name: str
    model_type: str
    tiny: Mapping[str, Any] = field(default_factory=dict)


_HEAD_DIM_16 = {"head_dim": 16}  # families whose default head_dim (128/256) exceeds a 64-wide tiny model

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "llama", {"tie_word_embeddings": True, "rope_theta": 10000.0}),  # like SmolLM2
        Family("gpt2", "gpt2"),
        Family("gpt_neox", "gpt_neox"),
        Family("opt", "opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
        Family("falcon", "falcon"),
        Family("bloom", "bloom"),
        Family("mpt", "mpt"),
        Family("qwen2", "qwen2"),
        Family("qwen3", "qwen3", _HEAD_DIM_16),
        Family("mistral", "mistral"),
        Family("mixtral", "mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        Family("phi", "phi"),
        Family("phi3", "phi3"),
        Family("gemma", "gemma", _HEAD_DIM_16),
        Family("gemma2", "gemma2", _HEAD_DIM_16),
        Family("gemma3", "gemma3_text", _HEAD_DIM_16),
        Family("olmo", "olmo"),
        Family("olmo2", "olmo2"),
        Family("starcoder2", "starcoder2"),
        Family("granite", "granite"),
        Family("stablelm", "stablelm"),
    )
}


def family(name: str) -> Family:
    """The family called ``name``; a ConfigError listing the known ones otherwise."""
    from ftlab.errors import ConfigError

    if name not in FAMILIES:
        raise ConfigError(f"model.family={name} is not a known architecture family; "
                          f"expected one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_model_type(model_type: str) -> str | None:
    """The family whose transformers ``model_type`` this is (``gemma3_text`` -> ``gemma3``)."""
    return next((f.name for f in FAMILIES.values() if f.model_type == model_type), None)
