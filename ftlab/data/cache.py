"""Cache tokenized examples on disk, keyed by everything that decides the tokens.

Why: tokenizing a data set (rendering every chat through its template) costs seconds to minutes
and gives the same result every run, so a second run, or every job of a sweep, with the same
data, tokenizer, template and settings loads the examples instead.

The key is a fingerprint of the prepared data, the tokenizer, the template and the encoding
settings, so any change to one of them gets a new entry rather than stale tokens. Entries are
written with ``ftlab.cache.build_once`` (a temporary folder moved into place under a file lock):
a crash never leaves a half-written entry and parallel jobs tokenize once, and an entry whose
files no longer match the sha256 recorded when it was written (a cut file, a token id changed in
place) is reported, removed and tokenized again instead of being trained on. Prints are
``ftlab.cache.fingerprint`` of the JSON the helpers below make of rows and tokenizers.

Storage is one safetensors file of int64 arrays: each list-valued field is flattened into one
array plus an offsets array, each int-valued field is one array. safetensors is already a
dependency (transformers), stores integers exactly, and loading is a single read plus
``tolist()`` (milliseconds for thousands of examples); ``datasets``/Arrow would work as well but
importing it alone takes about a second.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.cache import build_once, fingerprint

__all__ = ["cached_examples", "load_examples", "rows_fingerprint", "save_examples", "tokenizer_fingerprint"]

log = logging.getLogger(__name__)

DATA_FILE = "examples.safetensors"
KEY_FILE = "key.json"


def rows_fingerprint(rows: Any) -> str:
    """Print of data rows without their private ``_`` fields (bookkeeping such as a row's source
    line), so the same examples give the same print wherever they were read from."""
    return fingerprint([{k: v for k, v in row.items() if not k.startswith("_")} for row in rows])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Print of what decides a tokenizer's output: its backend (vocabulary, merges, normalizer,
    added tokens, post-processor), its chat template and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.to_str()
    else:  # slow tokenizers have no serialized backend; their vocabulary is the next best thing
        model = json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint(
        {
            "class": type(tokenizer).__name__,
            "backend": fingerprint(model.encode()),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "special_tokens": {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()},
        }
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def save_examples(examples: list[Mapping[str, Any]], path: Path) -> None:
    """Write examples whose fields are all ints or lists of ints (same fields in every example)."""
    from safetensors.numpy import save_file

    fields = list(examples[0]) if examples else []
    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    for name in fields:
        values = [ex[name] for ex in examples]
        if all(_is_int(v) for v in values):
            kinds[name] = "int"
            arrays[f"{name}.values"] = np.asarray(values, dtype=np.int64)
        elif all(isinstance(v, (list, tuple)) and all(_is_int(x) for x in v) for v in values):
            kinds[name] = "ints"
            arrays[f"{name}.values"] = np.fromiter((x for v in values for x in v), dtype=np.int64)
            arrays[f"{name}.offsets"] = np.cumsum([0, *map(len, values)], dtype=np.int64)
        else:
            raise TypeError(f"field '{name}' holds something other than ints or lists of ints; cannot cache it")
    for i, ex in enumerate(examples):
        if list(ex) != fields:
            raise ValueError(f"example {i} has fields {list(ex)}, example 0 has {fields}")
    meta = {"count": str(len(examples)), "fields": json.dumps(fields), "kinds": json.dumps(kinds)}
    save_file(arrays, str(path), metadata=meta)


def load_examples(path: Path) -> list[dict[str, Any]]:
    """Read what ``save_examples`` wrote, as plain Python ints and lists."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    count, fields, kinds = int(meta["count"]), json.loads(meta["fields"]), json.loads(meta["kinds"])
    columns: list[list[Any]] = []
    for name in fields:
        values = arrays[f"{name}.values"].tolist()
        if kinds[name] == "ints":
            offsets = arrays[f"{name}.offsets"].tolist()
            values = [values[a:b] for a, b in zip(offsets, offsets[1:])]
        columns.append(values)
    return [dict(zip(fields, row)) for row in zip(*columns)] if fields else [{} for _ in range(count)]


def cached_examples(
    cache_dir: Path,
    key: Mapping[str, Any],
    build: Callable[[], list[dict[str, Any]]],
    label: str,
) -> tuple[list[dict[str, Any]], bool]:
    """The examples stored under ``key``, built by ``build()`` and stored first if missing.

    Returns ``(examples, hit)``; ``hit`` is False when this call ran ``build``. ``key`` should
    hold everything that decides the tokens, e.g. ``{"data": rows_fingerprint(records), "tokenizer":
    tokenizer_fingerprint(tok), "template": ..., "settings": {"max_length": 256}}``.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
        raise ValueError(f"cache label {label!r} must be a plain file name (letters, digits, . _ -)")
    target = Path(cache_dir) / "tokenized" / f"{label}-{fingerprint(key, 16)}"
    built = False

    def write(tmp: Path) -> None:
        nonlocal built
        start = time.perf_counter()
        examples = build()
        save_examples(examples, tmp / DATA_FILE)
        (tmp / KEY_FILE).write_text(json.dumps({"label": label, "key": key}, indent=2, sort_keys=True))
        log.info(
            "tokenizing %d examples (cached to %s) took %.1fs", len(examples), target, time.perf_counter() - start
        )
        built = True

    build_once(target, write)  # returns at once when the entry is there
    start = time.perf_counter()
    examples = load_examples(target / DATA_FILE)  # read back even after building: same types either way
    if not built:
        seconds = time.perf_counter() - start
        log.info("cache hit for %s: %d examples from %s (%.2fs)", label, len(examples), target, seconds)
    return examples, not built
