"""Configurable preparation of raw rows into training examples, with a report of what changed.

Steps, in order: normalize whitespace in the raw record -> handle rows missing a required field
(error, drop or fill) -> convert to the canonical example (``ftlab.data.formats``; a ranked
preference row becomes one example per pair) -> drop exact duplicates -> add augmented copies
(training split only). After tokenization the data module
calls ``drop_by_length``.

Why a report: every dropped or filled row changes what a run trains on. ``PrepReport`` counts
each reason so the log and ``metrics.json`` say what the model actually saw, and the invariant
``rows - sum(dropped) + expanded + augmented == kept`` makes an unexpected loss of data visible.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ftlab.data.augment import discover_augmentations
from ftlab.data.formats import NEEDS, RANKED, missing_error, missing_fields, to_examples
from ftlab.data.sources import Row
from ftlab.errors import DataError

__all__ = ["MISSING_ACTIONS", "PrepReport", "PrepareConfig", "drop_by_length", "normalize_text", "prepare"]

MISSING_ACTIONS = ("error", "drop", "fill")


@dataclass
class PrepareConfig:
    """The ``data.prepare`` config node."""

    normalize_whitespace: bool = True  # strip fields, collapse spaces/tabs inside lines, \r\n -> \n, NFC
    missing: str = "error"  # error | drop | fill: a row whose required field is missing or empty
    fill: dict[str, str] = field(default_factory=dict)  # field -> value, for missing == "fill"
    dedup: bool = True  # drop exact duplicates (after normalization), keeping the first
    augment: list[str] = field(default_factory=list)  # registered augmentations, training split only
    augment_ratio: float = 1.0  # share of training examples that get an augmented copy (seeded)

    def __post_init__(self) -> None:
        for name in ("normalize_whitespace", "dedup"):
            if not isinstance(getattr(self, name), bool):
                raise DataError(f"data.prepare.{name} must be true or false, got {getattr(self, name)!r}")
        if self.missing not in MISSING_ACTIONS:
            raise DataError(
                f"data.prepare.missing must be one of {', '.join(MISSING_ACTIONS)}, got {self.missing!r}"
            )
        if not isinstance(self.fill, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.fill.items()
        ):
            raise DataError(f"data.prepare.fill must map field names to strings, got {self.fill!r}")
        self.fill = dict(self.fill)
        ratio = self.augment_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise DataError(f"data.prepare.augment_ratio must be a number in [0, 1], got {ratio!r}")
        if isinstance(self.augment, str) or not all(isinstance(a, str) for a in self.augment):
            raise DataError(f"data.prepare.augment must be a list of augmentation names, got {self.augment!r}")
        self.augment = list(self.augment)
        if self.augment:
            _augmentations(self.augment)

    @classmethod
    def from_any(cls, cfg: Any) -> "PrepareConfig":
        """Build from a DictConfig, dict or PrepareConfig; unknown keys are an error (typos)."""
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            return cls()
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            raise DataError(f"data.prepare must be a mapping, got {type(cfg).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        values = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
        for key in values:
            if key not in known:
                raise DataError(f"data.prepare.{key}: unknown field (known: {', '.join(known)})")
        return cls(**values)


def _augmentations(names: Sequence[str]) -> dict[str, Any]:
    """The named augmentations, or DataError naming the installed (and unloadable) ones."""
    found = discover_augmentations()
    return {name: found.get(name, where="data.prepare.augment") for name in names}


@dataclass
class PrepReport:
    """What preparation did to one source: rows read, dropped (by reason), filled, expanded
    (ranked preference rows: the examples beyond one per row), added, kept."""

    source: str
    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    filled: dict[str, int] = field(default_factory=dict)
    ranked_rows: int = 0  # ranked preference rows (prompt + responses), each giving all its pairs
    expanded: int = 0  # examples those rows added beyond one each
    augmented: int = 0
    kept: int = 0
    truncated: int = 0  # kept examples longer than data.max_length tokens, cut to it (tokens reports only)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        self.kept -= count

    def as_dict(self) -> dict:
        """Plain data for metrics.json."""
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """One self-contained line per fact, for the log."""
        out = [f"{self.source}: {self.rows} rows read, {self.kept} examples kept"]
        out += [f"{self.source}: dropped {n} {_rows(n)}: {reason}" for reason, n in self.dropped.items()]
        out += [f"{self.source}: filled missing field '{name}' in {n} {_rows(n)}" for name, n in self.filled.items()]
        if self.ranked_rows:
            pairs = self.ranked_rows + self.expanded
            out.append(f"{self.source}: {self.ranked_rows} ranked {_rows(self.ranked_rows)} gave {pairs} preference pairs")
        if self.augmented:
            out.append(f"{self.source}: added {self.augmented} augmented {'copy' if self.augmented == 1 else 'copies'}")
        if self.truncated:
            out.append(f"{self.source}: truncated {self.truncated} {_rows(self.truncated)} to data.max_length")
        return out


def _rows(n: int) -> str:
    return "row" if n == 1 else "rows"


_INNER_SPACE = re.compile(r"(?<=\S)[ \t]+(?=\S)")


def normalize_text(text: str) -> str:
    """NFC, ``\\n`` line ends, single spaces between words, no trailing spaces, stripped.

    Leading indentation inside the text is kept (code), and so are newlines (structure): only
    the invisible variation that makes equal texts look different (and defeats dedup) goes.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_INNER_SPACE.sub(" ", line).rstrip(" \t") for line in text.split("\n")]
    return "\n".join(lines).strip()


def _normalize(value: Any) -> Any:
    if isinstance(value, str):
        return normalize_text(value)
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return value


def _dedup_key(example: Mapping[str, Any]) -> str:
    data = {k: v for k, v in example.items() if not str(k).startswith("_")}
    return json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)


def prepare(
    rows: Sequence[Row], fmt: str, cfg: PrepareConfig, *, source: str, seed: int, train: bool
) -> tuple[list[dict], PrepReport]:
    """Canonical examples of ``rows`` (read as ``fmt``) and the report of what was done to them."""
    report = PrepReport(source=source, rows=len(rows), kept=len(rows))
    examples = []
    seen: set[str] = set()
    for row in rows:
        record = _normalize(row.record) if cfg.normalize_whitespace else dict(row.record)
        missing = missing_fields(record, fmt)
        if missing and cfg.missing == "error":
            raise missing_error(row.where, missing[0], fmt, record)
        if missing and cfg.missing == "drop":
            names = ", ".join(f"'{m}'" for m in missing)
            report.drop(f"missing field{'s' if len(missing) > 1 else ''} {names}")
            continue
        for name in missing:
            if name not in cfg.fill:
                raise DataError(
                    f"{row.where}: missing field '{name}' (format {fmt} needs {NEEDS[fmt]});"
                    f" data.prepare.fill has no value for '{name}'"
                )
            record[name] = cfg.fill[name]
            report.filled[name] = report.filled.get(name, 0) + 1
        converted = to_examples(Row(row.where, record), fmt)
        if fmt == "preference" and RANKED in record:
            report.ranked_rows += 1
            report.expanded += len(converted) - 1
            report.kept += len(converted) - 1
        for example in converted:
            if cfg.dedup:
                key = _dedup_key(example)
                if key in seen:
                    report.drop("duplicate")
                    continue
                seen.add(key)
            examples.append(example)
    if train and cfg.augment:
        examples += _augment(examples, cfg, seed, report)
    if rows and not examples:
        raise DataError(f"{source}: every row was dropped ({_reasons(report)})")
    return examples, report


def _augment(examples: list[dict], cfg: PrepareConfig, seed: int, report: PrepReport) -> list[dict]:
    """Augmented copies of ``round(augment_ratio * n)`` seeded picks, each through every augmentation.

    Each pick gets its own generator seeded by (seed, index), so adding an augmentation or data
    does not reshuffle the noise of the other examples.
    """
    functions = _augmentations(cfg.augment)
    count = round(cfg.augment_ratio * len(examples))
    picks = sorted(random.Random(f"ftlab-augment-pick-{seed}").sample(range(len(examples)), count))
    copies = []
    for index in picks:
        original = examples[index]
        rng = random.Random(f"ftlab-augment-{seed}-{index}")
        current, applied = original, []
        for name, fn in functions.items():
            try:
                result = fn(copy.deepcopy(current), rng)
            except Exception as exc:
                raise DataError(f"{original['_where']}: augmentation '{name}' failed ({type(exc).__name__}: {exc})") from exc
            if result is None:
                continue
            if not isinstance(result, dict):
                raise DataError(
                    f"{original['_where']}: augmentation '{name}' returned {type(result).__name__}"
                    " (expected an example dict or None)"
                )
            current, applied = result, [*applied, name]
        if applied:
            copies.append({**current, "_where": f"{original['_where']} (augmented: {', '.join(applied)})"})
    report.augmented += len(copies)
    report.kept += len(copies)
    return copies


def _reasons(report: PrepReport) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in report.dropped.items()) or "no reason recorded"


def drop_by_length(
    examples: list[dict], lengths: list[int], min_tokens: int, max_tokens: int | None, report: PrepReport
) -> list[dict]:
    """The examples whose token count is within [min_tokens, max_tokens], counting the others in ``report``."""
    if len(examples) != len(lengths):
        raise ValueError(f"{len(examples)} examples but {len(lengths)} lengths")
    kept = []
    for example, n in zip(examples, lengths):
        if n < min_tokens:
            report.drop(f"too short (< {min_tokens} tokens)")
        elif max_tokens is not None and n > max_tokens:
            report.drop(f"too long (> {max_tokens} tokens)")
        else:
            kept.append(example)
    if examples and not kept:
        raise DataError(f"{report.source}: every example was dropped ({_reasons(report)})")
    return kept
