"""From the ``data`` config to prepared train and validation examples (no tokenizer needed).

For each source (``data.path``, every entry of ``data.mix``, or the built-in generator when
both are empty): read its rows, hold out validation rows (``val_path`` or a seeded
``val_ratio`` split), detect or take its format, prepare each split (whitespace, missing
fields, duplicates, augmentation of the training split) and add the task prefix. Validation
examples that also occur in the training data are dropped: they would measure memorisation.
Several sources are then mixed by weight, and ``data.limit`` takes a fixed, seeded subset of
the training examples (few-shot runs).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

from ftlab.data.schema import DataConfig, SourceConfig
from ftlab.data.formats import detect_format
from ftlab.data.prepare import PrepReport, prepare
from ftlab.data.sources import Row, read_rows

__all__ = ["Splits", "load_splits", "split_records"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    reports: list[PrepReport] = field(default_factory=list)
    mixed: dict[str, int] = field(default_factory=dict)  # source -> training examples after mixing

    def summary(self) -> dict[str, Any]:
        """What preparation did, for metrics.json."""
        out: dict[str, Any] = {"train_examples": len(self.train), "val_examples": len(self.val)}
        out["preparation"] = [r.as_dict() for r in self.reports]
        if self.mixed:
            out["mix"] = self.mixed
        return out


def split_records(records: Sequence[T], val_ratio: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded random train/validation split (at least one of each when both are requested)."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = round(len(records) * val_ratio)
    if val_ratio > 0 and len(records) > 1:
        n_val = min(max(n_val, 1), len(records) - 1)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def _synthetic_rows(cfg: DataConfig) -> tuple[list[Row], list[Row], str]:
    if cfg.synthetic == "topics":
        from ftlab.data.topics import default_splits

        fmt = "classification"
    elif cfg.synthetic == "preference":
        from ftlab.data.synthetic import preference_splits as default_splits

        fmt = "preference"
    else:
        from ftlab.data.synthetic import default_splits

        fmt = "messages"
    train, val = default_splits(cfg.num_train, cfg.num_val, cfg.seed)
    rows = [[Row(f"synthetic {cfg.synthetic} {split} row {i}", r) for i, r in enumerate(records, 1)]
            for split, records in (("train", train), ("validation", val))]
    return rows[0], rows[1], fmt


def _content_key(example: dict) -> str:
    return json.dumps({k: v for k, v in example.items() if not k.startswith("_")}, sort_keys=True)


def _prefixed(messages: list[dict], prefix: str) -> list[dict]:
    messages = [dict(m) for m in messages]
    for m in messages:
        if m["role"] == "user":
            m["content"] = f"{prefix}{m['content']}"
            break
    return messages


def _with_prefix(example: dict, prefix: str) -> dict:
    """The task prefix goes where the model reads the task: the first user turn (of both sides of
    a preference pair), or the text."""
    if "messages" in example:
        out = {**example, "messages": _prefixed(example["messages"], prefix)}
        if isinstance(example.get("rejected"), list):
            out["rejected"] = _prefixed(example["rejected"], prefix)
        return out
    return {**example, "text": f"{prefix}{example['text']}"}


def _load_source(src: SourceConfig, cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict], list[PrepReport]]:
    if src.path:
        rows = read_rows(src.path, src.split)
        if src.val_path:
            train_rows, val_rows = rows, read_rows(src.val_path, src.split)
        else:
            train_rows, val_rows = split_records(rows, cfg.val_ratio, seed)
        fmt = src.format if src.format != "auto" else detect_format(rows, src.path)
        name = src.path
    else:
        train_rows, val_rows, fmt = _synthetic_rows(cfg)
        fmt = fmt if src.format == "auto" else src.format
        name = f"synthetic {cfg.synthetic}"
    train, train_report = prepare(train_rows, fmt, cfg.prepare, source=f"{name} (train)", seed=seed, train=True)
    val, val_report = prepare(val_rows, fmt, cfg.prepare, source=f"{name} (validation)", seed=seed, train=False)
    seen = {_content_key(e) for e in train}
    leaked = [e for e in val if _content_key(e) in seen]
    if leaked:
        val = [e for e in val if _content_key(e) not in seen]
        val_report.dropped["also in the training data"] = len(leaked)
        val_report.kept = len(val)
    if src.prefix:
        train = [_with_prefix(e, src.prefix) for e in train]
        val = [_with_prefix(e, src.prefix) for e in val]
    return train, val, [train_report, val_report]


def _take(examples: list[dict], n: int, rng: random.Random) -> list[dict]:
    """``n`` examples: a seeded shuffle, repeated when a source is asked for more than it has."""
    out: list[dict] = []
    while len(out) < n:
        order = list(examples)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def load_splits(cfg: DataConfig) -> Splits:
    """Prepared training and validation examples for the whole ``data`` config."""
    if cfg.mix:
        sources = cfg.mix
    else:
        sources = [SourceConfig(path=cfg.path or "", format=cfg.format, val_path=cfg.val_path, split=cfg.split)]
    loaded = [_load_source(s, cfg, cfg.seed + i) for i, s in enumerate(sources)]
    splits = Splits([], [], [r for _, _, reports in loaded for r in reports])
    if len(loaded) == 1:
        splits.train, splits.val = loaded[0][0], loaded[0][1]
    else:
        total = sum(len(t) for t, _, _ in loaded)
        weights = sum(s.weight for s in sources)
        rng = random.Random(f"ftlab-mix-{cfg.seed}")
        for src, (train, val, _) in zip(sources, loaded):
            n = round(total * src.weight / weights) if train else 0
            splits.train.extend(_take(train, n, rng))
            splits.val.extend(val)
            splits.mixed[src.path] = n
        rng.shuffle(splits.train)
        log.info("mixed %d sources: %s training examples", len(loaded), splits.mixed)
    if cfg.limit is not None and cfg.limit < len(splits.train):
        keep = sorted(random.Random(f"ftlab-limit-{cfg.seed}").sample(range(len(splits.train)), cfg.limit))
        splits.train = [splits.train[i] for i in keep]
        log.info("data.limit=%d: training on a fixed subset of %d examples", cfg.limit, cfg.limit)
    for report in splits.reports:
        for line in report.lines():
            log.info("%s", line)
    return splits
