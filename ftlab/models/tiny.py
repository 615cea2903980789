"""``model.kind: tiny``: a small random model of any family (``model.family``, Llama by default)
sized to the shipped tiny tokenizer.

Why: tests, the method contract and quick runs need a real Llama (tied embeddings, GQA, the
layers every method targets) that trains in milliseconds and never touches the hub; the support
matrix needs the same for every architecture family (``ftlab.models.families``), built from that
family's own transformers config class. Its seeded
random weights are written once to ``cache_dir/tiny-<key>`` (``ftlab.cache.build_once``, which
checks the folder against the hashes written with it on every load and rebuilds a damaged one)
and then loaded, and quantized, through ``from_pretrained`` like any real checkpoint.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ftlab.cache import build_once, fingerprint
from ftlab.models.families import family
from ftlab.models.quant import cfg_get
from ftlab.models.tiny_tokenizer import TOKENIZER_DIR as TINY_TOKENIZER_DIR

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

__all__ = ["TINY_DEFAULTS", "TINY_TOKENIZER_DIR", "tiny_checkpoint", "tiny_config"]

TINY_FORMAT = 1  # part of the folder key: bump to rebuild cached tiny models when the recipe changes

TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "init_seed": 0,
}


def tiny_config(model_cfg: Any, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The family's own config class (``model.family``; Llama: shaped like SmolLM2, with tied
    embeddings and GQA) with the tiny sizes: a few hundred KB of weights. The common size names
    (``hidden_size``, ...) reach each family's own fields (GPT-2's ``n_embd``) through transformers'
    attribute maps."""
    from transformers import AutoConfig

    chosen = family(str(cfg_get(model_cfg, "family", "llama")))
    sizes = {k: int(cfg_get(model_cfg, k, v)) for k, v in TINY_DEFAULTS.items() if k != "init_seed"}
    if not _grouped_query(chosen.model_type):
        # a family without grouped-query attention (GPT-2, OPT, Falcon, ...) must not carry the key:
        # its attention ignores it, and PEFT's prefix tuning would size its cache by it
        del sizes["num_key_value_heads"]
    return AutoConfig.for_model(
        chosen.model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
        **chosen.tiny,
    )


@functools.lru_cache(maxsize=None)
def _grouped_query(model_type: str) -> bool:
    """Whether the family's config has ``num_key_value_heads`` of its own (read from its defaults)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default configs warn about their own token ids
    try:
        return hasattr(AutoConfig.for_model(model_type), "num_key_value_heads")
    finally:
        hf_logging.set_verbosity(level)


def tiny_checkpoint(model_cfg: Any, cache_dir: str | Path) -> Path:
    """Write the tiny model's seeded random weights once, so it can be loaded (and quantized)
    through ``from_pretrained`` like any real checkpoint; returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))  # ships with its pad token
    config = tiny_config(model_cfg, tokenizer)
    seed = int(cfg_get(model_cfg, "init_seed", TINY_DEFAULTS["init_seed"]))
    tok_digest = fingerprint((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    arch = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    key = fingerprint({"config": arch, "seed": seed, "tokenizer": tok_digest, "format": TINY_FORMAT}, 12, strict=False)

    def build(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig.from_model_config(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return build_once(Path(cache_dir) / f"tiny-{key}", build)
