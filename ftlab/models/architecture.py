"""What model a config names, known before any weight loads: its config, its own name, and an
empty (meta-device) copy of its module tree.

Why: a method that cannot train an architecture (OFT on GPT-2's Conv1D layers, prefix tuning on
one KV head) and a quantization that cannot replace its layers (Falcon's ``FalconLinear``) must be
refused in one line before minutes of loading, and the name a run reports must be the model's
own (``Qwen/Qwen2.5-0.5B-Instruct``, ``my-model``), not the config group's. The config comes from
the folder's ``config.json`` (or the hub, or the GGUF's header, or the tiny family's config
class); the module tree is built on the ``meta`` device from it, which allocates no weights, so
``ftlab.models.structure`` can be asked about blocks and layers of a 7B model in milliseconds.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.errors import ConfigError, ModelLoadError
from ftlab.models.families import family_of_model_type
from ftlab.models.quant import cfg_get

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

__all__ = ["Architecture", "architecture", "model_label"]

log = logging.getLogger(__name__)


class Architecture:
    """A model's config (``config``), its own name (``label``) and its meta-device module tree
    (``skeleton``, built on first use)."""

    def __init__(self, config: PretrainedConfig, label: str) -> None:
        self.config = config
        self.label = label

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "") or "unknown")

    @property
    def family(self) -> str | None:
        """The ftlab family (``ftlab.models.families``) of this model type, if it is one."""
        return family_of_model_type(self.model_type)

    @property
    def class_name(self) -> str:
        """The causal-LM class transformers builds for this config (``Qwen2ForCausalLM``)."""
        return type(self.skeleton).__name__

    @functools.cached_property
    def skeleton(self) -> nn.Module:
        """The causal-LM module tree with every tensor on the meta device (no memory, no init)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                self.config, trust_remote_code=bool(getattr(self.config, "auto_map", None)))

    def describe(self) -> str:
        """``my-model (qwen2)``: the name a user gave and the architecture transformers reads."""
        return self.label if self.model_type in self.label else f"{self.label} ({self.model_type})"


def model_label(model_cfg: Any) -> str:
    """The model's own name, for metrics.json, logs, comparison tables and model cards: the hub id
    as given, a local folder's name, the default GGUF's model name, or ``tiny-<family>``."""
    from ftlab.models.gguf import SMOLLM2_NAME

    kind = str(cfg_get(model_cfg, "kind", "pretrained"))
    if kind == "tiny":
        return f"tiny-{cfg_get(model_cfg, 'family', 'llama')}"
    source, gguf_file = cfg_get(model_cfg, "name_or_path"), cfg_get(model_cfg, "gguf_file")
    if source is None:
        return SMOLLM2_NAME
    if gguf_file is not None:
        return Path(str(gguf_file)).stem
    path = Path(str(source)).expanduser()
    return path.resolve().name if path.exists() else str(source)


def _encoder_decoder(config: PretrainedConfig, label: str) -> None:
    """Refuse a base that is not a decoder-only LM (T5, BART: ``AutoModelForCausalLM`` has no
    class for them, or builds only their decoder), naming what it is."""
    from transformers import AutoModelForCausalLM

    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if getattr(config, "is_encoder_decoder", False) or not (remote or type(config) in AutoModelForCausalLM._model_mapping):
        what = "an encoder-decoder (sequence-to-sequence) model" if getattr(config, "is_encoder_decoder", False) \
            else "not a causal (decoder-only) language model transformers can build"
        raise ConfigError(
            f"model {label} ({getattr(config, 'model_type', '?')}) is {what}; ftlab fine-tunes causal "
            "language models (Llama, Qwen, Mistral, GPT-2, ... see docs/models.md)"
        )


def _pretrained_config(model_cfg: Any, cache_dir: str | Path, label: str) -> PretrainedConfig:
    from transformers import AutoConfig

    from ftlab.models.gguf import SMOLLM2_NAME, smollm2_gguf

    trust = bool(cfg_get(model_cfg, "trust_remote_code", False))
    source, gguf_file = cfg_get(model_cfg, "name_or_path"), cfg_get(model_cfg, "gguf_file")
    if source is None:  # the packaged SmolLM2: its converted folder when there is one, else the GGUF's header
        converted = Path(cache_dir) / SMOLLM2_NAME / "config.json"
        if converted.is_file():
            return AutoConfig.from_pretrained(str(converted.parent))
        folder, gguf_file = smollm2_gguf()
        return AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file)
    local = Path(str(source)).expanduser().exists()
    try:
        kwargs: dict[str, Any] = {"trust_remote_code": trust}
        if gguf_file is not None:
            kwargs["gguf_file"] = str(gguf_file)
        if not local:
            try:  # transformers' cache first: no network needed for a model fetched before
                return AutoConfig.from_pretrained(str(source), local_files_only=True, **kwargs)
            except OSError:
                if not _hub_reachable():  # fail at once rather than after the hub client's ~30 s of retries
                    raise OSError("no connection to the hub and not in transformers' cache") from None
        return AutoConfig.from_pretrained(str(source), **kwargs)
    except Exception as err:  # noqa: BLE001 - a missing, unreachable or unreadable config (a GGUF's header too)
        where = "" if local else (" (not a local folder, and the hub cannot be reached or has no such model: "
                                  "download it and pass model.name_or_path=FOLDER)")
        reason = " ".join(str(err).split())[:300]
        raise ModelLoadError(f"cannot read the config of model {label}{where}: {reason}") from err


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host (``HF_ENDPOINT``) accepts a connection; False offline (``HF_HUB_OFFLINE``)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer() -> Any:
    """The shipped tiny tokenizer, read once per process (a tiny config is sized to it)."""
    from ftlab.models.loading import load_tokenizer
    from ftlab.models.tiny import TINY_TOKENIZER_DIR

    return load_tokenizer(TINY_TOKENIZER_DIR)


@functools.lru_cache(maxsize=64)
def _cached(model_json: str, cache_dir: str) -> Architecture:
    from ftlab.models.tiny import tiny_config

    model_cfg = json.loads(model_json)
    label = model_label(model_cfg)
    if str(model_cfg.get("kind", "pretrained")) == "tiny":
        config = tiny_config(model_cfg, _tiny_tokenizer())
    else:
        config = _pretrained_config(model_cfg, cache_dir, label)
    _encoder_decoder(config, label)
    return Architecture(config, label)


def architecture(model_cfg: Any, cache_dir: str | Path) -> Architecture:
    """The architecture ``model_cfg`` names, read without loading weights (cached per config).
    A ``model.name_or_path`` on ``kind: tiny`` (random weights, nothing to load) is refused, and so
    is an encoder-decoder or any model transformers cannot build as a causal LM."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    if str(plain.get("kind", "pretrained")) == "tiny" and plain.get("name_or_path") is not None:
        raise ConfigError(
            f"model.name_or_path={plain['name_or_path']} is set on model={plain.get('name', 'tiny')}, which builds "
            "random weights and loads none; to train that checkpoint use model=llama (or the preset of its "
            "family, see docs/models.md) with model.name_or_path=..."
        )
    return _cached(json.dumps(plain, sort_keys=True, default=str), str(cache_dir))
