"""Cheap checks of a model folder before anything loads it: headers and file sizes, never weights.

``model.name_or_path`` names a hub id or a local folder. A hub id (``gpt2``, ``org/name``) that
is not a local path passes through to transformers untouched. A local folder must exist; its
``config.json`` must parse; every ``*.safetensors`` file must hold the whole header its first 8
bytes announce and every byte of tensor data that header's ``data_offsets`` declare (a truncated
download or copy); every shard a ``*.index.json`` lists must be there and hold the tensors it
lists. With the whole model config (``check_model_config``) the folder must also have a config
and weights to load, or the GGUF file ``model.gguf_file`` names.

This module imports nothing heavy, so the command line can run it before torch is imported.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from ftlab.errors import ModelLoadError

__all__ = ["check_model_config", "check_model_source", "check_safetensors", "is_hub_id"]

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on its JSON header


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id (``gpt2``, ``org/name``) rather than a path."""
    return bool(HUB_ID.fullmatch(name)) and ".." not in name


def _local(name_or_path: Any) -> Path | None:
    """The local path ``name_or_path`` names, or None for a hub id that is not a local path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists() or not is_hub_id(text):
        return path
    return None


def check_model_source(name_or_path: Any, gguf_file: Any = None, complete: bool = False) -> None:
    """Refuse a local ``name_or_path`` that cannot load, naming the folder or file and what is
    wrong; a hub id passes. ``complete``: also require a config and weights (or ``gguf_file``)."""
    if name_or_path is None:
        return
    path = _local(name_or_path)
    if path is None:
        return
    key = f"model.name_or_path={name_or_path}"
    if not path.exists():
        raise ModelLoadError(f"{key}: no such folder (a hub id reads org/name)")
    if not path.is_dir():
        hint = f" (for a GGUF file: model.name_or_path={path.parent} model.gguf_file={path.name})" \
            if path.suffix == ".gguf" else ""
        raise ModelLoadError(f"{key}: not a folder; give the folder holding config.json and the weights{hint}")
    try:
        config = path / "config.json"
        if config.is_file():
            _read_json(config, key)
        for file in sorted(path.glob("*.safetensors")):
            check_safetensors(file, key)
        for index in sorted(path.glob("*.index.json")):
            _check_index(index, key)
        if complete:
            _check_complete(path, key, gguf_file)
    except OSError as exc:  # unreadable (permissions, a broken link): say which file
        raise ModelLoadError(f"{key}: cannot read {exc.filename or path} ({exc.strerror or exc})") from None


def check_model_config(model_cfg: Any) -> None:
    """The checks of ``check_model_source`` on a ``model`` config node, with its ``gguf_file``;
    ``gguf_file`` without ``name_or_path`` is an error too."""
    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)
    source, gguf_file = get("name_or_path", None), get("gguf_file", None)
    if source is None and gguf_file is not None and str(get("kind", "pretrained")) == "pretrained":
        raise ModelLoadError("model.gguf_file is set but model.name_or_path is null: "
                             "name the folder or hub id holding it")
    check_model_source(source, gguf_file, complete=True)


def _check_complete(path: Path, key: str, gguf_file: Any) -> None:
    if gguf_file is not None:
        gguf = path / str(gguf_file)
        if not gguf.is_file():
            raise ModelLoadError(f"{key}: model.gguf_file '{gguf_file}' not found in {path}")
        with gguf.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ModelLoadError(f"{gguf}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        return
    if (path / "adapter_config.json").is_file():
        return  # a PEFT adapter folder: transformers loads its base, then the adapter
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{key}: no config.json in {path} (a model folder holds config.json and its weights)")
    if not any((path / name).is_file() for name in WEIGHTS):
        raise ModelLoadError(f"{key}: no model weights in {path} (expected one of: {', '.join(WEIGHTS)})")


def _read_json(file: Path, key: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{key}: {file} is not UTF-8 text (invalid byte at position {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{key}: {file} is not valid JSON "
                             f"(line {exc.lineno} column {exc.colno}: {exc.msg})") from None


def check_safetensors(file: Path, key: str = "") -> set[str]:
    """The tensor names of a safetensors file, after checking that it holds its whole header and
    every byte of tensor data the header declares; a ``ModelLoadError`` naming the file otherwise."""
    where = f"{key}: {file}" if key else str(file)
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(f"{where} is truncated: {size} bytes, not even the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER:
            raise ModelLoadError(f"{where} is not a safetensors file (its header length reads {length} bytes)")
        if 8 + length > size:
            raise ModelLoadError(f"{where} is truncated: its header needs {8 + length} bytes, the file has {size}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(f"{where} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{where} is not a safetensors file (its header is not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ModelLoadError(f"{where} is not a safetensors file (tensor {name!r} has no valid data_offsets)")
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise ModelLoadError(f"{where} is truncated: its header declares {8 + length + end} bytes of header and "
                             f"tensor data, the file has {size}")
    return {name for name in header if name != "__metadata__"}


def _check_index(index: Path, key: str) -> None:
    data = _read_json(index, key)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{key}: {index} has no weight_map (the tensor -> shard file table)")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(str(shard), []).append(str(tensor))
    for shard, tensors in sorted(shards.items()):
        file = index.parent / shard
        if not file.is_file():
            raise ModelLoadError(f"{key}: {index.name} lists the shard {shard}, which is missing from {index.parent}")
        if file.suffix == ".safetensors":
            missing = sorted(set(tensors) - check_safetensors(file, key))
            if missing:
                raise ModelLoadError(f"{key}: {file} lacks {len(missing)} tensor(s) {index.name} puts there "
                                     f"(first: {missing[0]})")
