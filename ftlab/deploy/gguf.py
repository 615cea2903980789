"""A merged Llama-architecture export written as one GGUF file, with the ``gguf`` package alone.

The ``gguf`` package (from llama.cpp, pure Python) writes the container, names the tensors
(``TensorNameMap``) and reads the tokenizer's merges, special ids and chat template
(``SpecialVocab``). What llama.cpp's ``convert_hf_to_gguf.py`` adds on top, and which is not
in the package, is per architecture; for Llama it is small and is done here:

* the hyperparameters under ``llama.*``;
* the q/k projection rows reordered into the rotary layout llama.cpp uses (the same
  ``permute`` as the converter; transformers' GGUF reader undoes it);
* the token list and types (special added tokens CONTROL, others USER_DEFINED);
* the pre-tokenizer name (``tokenizer.ggml.pre``), which the converter finds by hashing the
  tokenizer's output against a table of known models. Here it comes from the base's own GGUF
  when ftlab converted the base from one (the default SmolLM2), or else from the two
  pre-tokenizer layouts whose llama.cpp name is known: byte-level BPE (``gpt-2``) and
  single digits + byte-level BPE (``smollm``). Anything else is refused, since a wrong name
  loads but tokenizes differently.

Only Llama models (``LlamaForCausalLM``, unscaled RoPE, no biases) with a byte-level BPE
tokenizer are written; everything else is refused with what is missing. Weights keep the
export's dtype (F32, F16 or BF16); norms are F32, as llama.cpp expects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.errors import GgufError

__all__ = ["GgufError", "check_gguf", "write_gguf"]

GGUF_FILE = "model.gguf"
SOURCE_FILE = "ftlab_source.json"  # written by ftlab.models.gguf.convert_gguf into a converted base folder
ARCHITECTURES = ("LlamaForCausalLM",)


def check_gguf() -> None:
    """Fail before any work when the ``gguf`` package is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise GgufError(f"--gguf needs the 'gguf' package (pip install gguf): {err}") from None


def _config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise GgufError(f"--gguf writes {', '.join(ARCHITECTURES)} models; this export is {arch} "
                        "(other architectures need llama.cpp's convert_hf_to_gguf.py)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise GgufError(f"--gguf: RoPE scaling '{rope.get('rope_type')}' is not supported; only unscaled RoPE")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise GgufError("--gguf: Llama models with attention or MLP biases are not supported")
    heads = int(config["num_attention_heads"])
    if int(config.get("head_dim") or config["hidden_size"] // heads) * heads != int(config["hidden_size"]):
        raise GgufError("--gguf: head_dim * num_attention_heads must equal hidden_size")
    return config


def _pre_tokenizer(tokenizer: dict[str, Any], base: Path | None) -> str:
    """llama.cpp's name for the pre-tokenizer (see the module docstring)."""
    source = base / SOURCE_FILE if base is not None else None
    if source is not None and source.is_file():
        import gguf

        info = json.loads(source.read_text())
        field = gguf.GGUFReader(Path(info["source"]) / info["gguf_file"]).get_field("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1].get("type") == "ByteLevel" and steps[-1].get("use_regex", True) and not steps[-1].get(
        "add_prefix_space", False)
    if kinds == ["ByteLevel"] and byte_level:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and byte_level and steps[0].get("individual_digits"):
        return "smollm"
    raise GgufError(f"--gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp name "
                    "known here (gpt-2: byte-level BPE; smollm: single digits + byte-level BPE); llama.cpp's "
                    "converter identifies others by hashing their output, which the gguf package cannot do")


def _vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types, as the converter makes them for BPE vocabularies."""
    import gguf

    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    model = tokenizer["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer.get("decoder") or {}).get("type") != "ByteLevel":
        raise GgufError("--gguf needs a byte-level BPE tokenizer (GPT-2 style tokenizer.json); this one is "
                        f"{model.get('type')} with a {(tokenizer.get('decoder') or {}).get('type')} decoder")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in tokenizer.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def _adds_bos(folder: Path) -> bool:
    """Whether the tokenizer puts BOS in front of a text, which llama.cpp must then do too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from transformers' rotary layout (halves) to llama.cpp's (pairs)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensors(folder: Path, config: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight; the tied output head is left out, as llama.cpp
    falls back to the token embeddings when ``output.weight`` is missing."""
    import gguf
    import torch
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    out = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GgufError(f"--gguf: no llama.cpp name for the weight '{key}'")
                array = f.get_tensor(key).to(torch.float32).numpy()
                if key.endswith("q_proj.weight"):
                    array = _permute(array, heads)
                elif key.endswith("k_proj.weight"):
                    array = _permute(array, kv_heads)
                out.append((name, array))
    return out


def write_gguf(folder: Path, name: str, base: str | Path | None = None) -> Path:
    """Write ``folder/model.gguf`` from the merged model folder ``folder``; return its path."""
    import gguf

    check_gguf()
    config = _config(folder)
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    qtype = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
             "bfloat16": gguf.GGMLQuantizationType.BF16}[dtype]
    file_type = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                 "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    base_dir = Path(base) if base is not None and Path(base).is_dir() else None
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    pre = _pre_tokenizer(tokenizer, base_dir)
    vocab_size = int(config["vocab_size"])
    tokens, types = _vocab(folder, vocab_size)
    heads = int(config["num_attention_heads"])
    rope = config.get("rope_parameters") or {}

    path = folder / GGUF_FILE
    writer = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(file_type)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(int(config.get("head_dim") or config["hidden_size"] // heads))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_add_bos_token(_adds_bos(folder))
    writer.add_add_space_prefix(False)  # byte-level BPE puts no space before the first word
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    for tensor_name, array in _tensors(folder, config):
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor_name, array)
        else:
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
