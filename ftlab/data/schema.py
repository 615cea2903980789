"""The ``data`` config node as typed dataclasses, checked field by field.

Why a dataclass next to the YAML: the data module is also built outside Hydra (tests, ``ftlab
eval``), and a typo such as ``data.batchsize`` or ``data.mix[0].wieght`` must be an error that
names the field and lists the valid ones, not a silently ignored key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ftlab.data.prepare import PrepareConfig
from ftlab.errors import DataError

__all__ = ["DataConfig", "SourceConfig", "SYNTHETIC"]

SYNTHETIC = ("instructions", "topics", "preference")  # the generators behind ``path: null``
FORMAT_CHOICES = ("auto", "alpaca", "messages", "completion", "text", "classification", "preference")


def _plain(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):  # resolve interpolations such as ``seed: ${seed}``
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _fields(cls: type, values: Any, where: str) -> dict[str, Any]:
    """``values`` as a dict, with unknown keys an error naming ``where`` and the known fields."""
    values = _plain(values)
    if not isinstance(values, Mapping):
        raise DataError(f"{where} must be a mapping, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    values = {str(k): v for k, v in values.items() if not str(k).startswith("_")}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DataError(f"unknown data config field(s) {', '.join(f'{where}.{u}' for u in unknown)}; known: {', '.join(known)}")
    return values


@dataclass
class SourceConfig:
    """One dataset of a multi-task mix (``data.mix``)."""

    path: str = ""
    weight: float = 1.0  # share of the mixed training set, relative to the other sources
    format: str = "auto"
    prefix: str | None = None  # prepended to the user turn (or the text): tells the model which task
    val_path: str | None = None  # else val_ratio of `path` is held out
    split: str | None = None  # split of a saved DatasetDict or hub dataset


@dataclass
class DataConfig:
    """The ``data`` config node (see ``ftlab/conf/data/synthetic.yaml`` for each field's meaning)."""

    name: str = "synthetic"
    path: str | None = None
    val_path: str | None = None
    val_ratio: float = 0.1
    split: str | None = None
    format: str = "auto"
    mix: list[SourceConfig] = field(default_factory=list)
    limit: int | None = None
    labels: list[str] | None = None
    synthetic: str = "instructions"
    num_train: int = 2000
    num_val: int = 200
    max_length: int = 256
    min_tokens: int = 0
    max_tokens: int | None = None
    packing: bool = False
    cache: bool = True
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 0
    seed: int = 0

    @classmethod
    def from_any(cls, cfg: Any) -> "DataConfig":
        """Build from a DictConfig, dict or DataConfig; unknown keys and bad values are errors."""
        if isinstance(cfg, cls):
            return cfg
        values = _fields(cls, {} if cfg is None else cfg, "data")
        if "prepare" in values:
            values["prepare"] = PrepareConfig.from_any(values["prepare"] or {})
        if values.get("mix"):
            values["mix"] = [
                SourceConfig(**_fields(SourceConfig, m, f"data.mix[{i}]")) for i, m in enumerate(values["mix"])
            ]
        else:
            values["mix"] = []
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        def bad(name: str, value: Any, expected: str) -> DataError:
            return DataError(f"data.{name}={value!r} is not valid: expected {expected}")

        if not 0.0 <= self.val_ratio < 1.0:
            raise bad("val_ratio", self.val_ratio, "a share in [0, 1)")
        for name, fmt in [("format", self.format)] + [(f"mix[{i}].format", m.format) for i, m in enumerate(self.mix)]:
            if fmt not in FORMAT_CHOICES:
                raise bad(name, fmt, " | ".join(FORMAT_CHOICES))
        if self.synthetic not in SYNTHETIC:
            raise bad("synthetic", self.synthetic, " | ".join(SYNTHETIC))
        if self.limit is not None and self.limit < 1:
            raise bad("limit", self.limit, "a positive number of training examples, or null for all")
        if self.max_length < 1:
            raise bad("max_length", self.max_length, "a positive number of tokens")
        if self.max_tokens is not None and self.max_tokens < max(self.min_tokens, 1):
            raise bad("max_tokens", self.max_tokens, f"null or at least min_tokens ({self.min_tokens}) and 1")
        for i, m in enumerate(self.mix):
            if not m.path:
                raise DataError(f"data.mix[{i}].path is missing: each mixed source names its file or folder")
            if m.weight <= 0:
                raise bad(f"mix[{i}].weight", m.weight, "a positive number")
        if self.mix and self.path is not None:
            raise DataError("data.path and data.mix are both set: list every source under data.mix, or use data.path alone")
