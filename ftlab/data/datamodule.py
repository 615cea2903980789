"""Lightning data module: records -> encoded examples -> padded, reproducibly shuffled batches.

The module is built from the ``data`` config before the model exists; the training code calls
``connect(tokenizer)`` once the model (and so the tokenizer and its context length) is loaded,
LitGPT style, and Lightning then calls ``setup()`` and the dataloader hooks.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ftlab.data.chat import IGNORE_INDEX, encode_chat, num_label_tokens
from ftlab.data.sources import DataError, load_jsonl
from ftlab.data.synthetic import default_splits

__all__ = ["DataConfig", "ChatDataModule", "EncodedDataset", "PadCollator", "split_records"]

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The ``data`` config node; ``path: null`` selects the built-in synthetic data."""

    name: str = "synthetic"
    path: str | None = None  # JSONL with training records; null = ftlab.data.synthetic
    val_path: str | None = None  # JSONL with validation records; null = split from ``path``
    val_ratio: float = 0.1  # share of ``path`` held out for validation when val_path is null
    num_train: int = 2000  # synthetic data only
    num_val: int = 200  # synthetic data only
    max_length: int = 256  # tokens per example (capped by the model's context in connect())
    batch_size: int = 8
    eval_batch_size: int = 16
    num_workers: int = 0
    seed: int = 0  # synthetic data, the val_ratio split and the training shuffle order

    @classmethod
    def from_any(cls, cfg: Any) -> "DataConfig":
        """Build from a DictConfig, dict or DataConfig; unknown keys are an error (typos)."""
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            return cls()
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):  # resolve interpolations such as ``seed: ${seed}``
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            raise TypeError(f"data config must be a mapping, got {type(cfg).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(known)}")
        config = cls(**values)
        if not 0.0 <= config.val_ratio < 1.0:
            raise ValueError(f"data.val_ratio must be in [0, 1), got {config.val_ratio}")
        return config


def split_records(records: Sequence[dict], val_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
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


class EncodedDataset(Dataset):
    """A list of encoded examples (dicts of token-id lists)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class PadCollator:
    """Right-pad a batch: ``pad_id`` in input_ids, 0 in attention_mask, -100 in labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([ex[key] + [value] * (width - len(ex[key])) for ex in batch], dtype=torch.long)
            for key, value in fill.items()
        }


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (padding is masked out, so any id works)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad nor an eos token to pad batches with")


class ChatDataModule(pl.LightningDataModule):
    """Chat records from JSONL (or the synthetic default), encoded with the model's chat template."""

    def __init__(self, cfg: Any = None) -> None:
        super().__init__()
        self.cfg = DataConfig.from_any(cfg)
        self.tokenizer: Any = None
        self.max_length = self.cfg.max_length
        self._records: tuple[list[dict], list[dict]] | None = None
        self.train_dataset: EncodedDataset | None = None
        self.val_dataset: EncodedDataset | None = None
        self.collator: PadCollator | None = None

    def connect(self, tokenizer: Any, max_length: int | None = None) -> None:
        """Attach the tokenizer; ``max_length`` (the model's context) caps ``cfg.max_length``."""
        self.tokenizer = tokenizer
        self.max_length = self.cfg.max_length if max_length is None else min(self.cfg.max_length, max_length)
        self.collator = PadCollator(pad_id_of(tokenizer))
        self.train_dataset = self.val_dataset = None  # re-encode with the new tokenizer

    def _load(self) -> tuple[list[dict], list[dict]]:
        if self._records is None:
            c = self.cfg
            if c.path is None:
                self._records = default_splits(c.num_train, c.num_val, c.seed)
            elif c.val_path is not None:
                self._records = load_jsonl(c.path), load_jsonl(c.val_path)
            else:
                self._records = split_records(load_jsonl(c.path), c.val_ratio, c.seed)
        return self._records

    @property
    def train_records(self) -> list[dict]:
        """Raw training records (normalized ``{"messages": [...]}``); needs no tokenizer."""
        return self._load()[0]

    @property
    def val_records(self) -> list[dict]:
        """Raw validation records, for generation-based evaluation; needs no tokenizer."""
        return self._load()[1]

    def _encode(self, records: list[dict], split: str) -> EncodedDataset:
        examples = [encode_chat(self.tokenizer, r["messages"], self.max_length) for r in records]
        kept = [ex for ex in examples if num_label_tokens(ex) > 0]
        if len(kept) < len(examples):
            log.warning(
                "%s: dropped %d of %d %s examples with no assistant tokens left after truncation"
                " to max_length=%d",
                self.cfg.name, len(examples) - len(kept), len(examples), split, self.max_length,
            )
        if records and not kept:
            raise DataError(
                f"{self.cfg.name}: every {split} example lost its assistant tokens to truncation;"
                f" raise data.max_length (now {self.max_length})"
            )
        return EncodedDataset(kept)

    def setup(self, stage: str | None = None) -> None:
        """Load and encode both splits (once; ``connect`` must have been called)."""
        if self.tokenizer is None:
            raise RuntimeError("call ChatDataModule.connect(tokenizer) before setup()")
        if self.train_dataset is None:
            self.train_dataset = self._encode(self.train_records, "train")
            self.val_dataset = self._encode(self.val_records, "validation")
            lengths = [len(ex["input_ids"]) for ex in self.train_dataset.examples]
            log.info(
                "%s: %d train / %d validation examples, train tokens mean %.1f max %d",
                self.cfg.name, len(self.train_dataset), len(self.val_dataset),
                sum(lengths) / max(len(lengths), 1), max(lengths, default=0),
            )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a generator seeded by ``cfg.seed``: same seed, same batch order."""
        assert self.train_dataset is not None, "call setup() first"
        return DataLoader(
            self.train_dataset,
            batch_size=self.cfg.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        """In order; an empty list (Lightning skips validation) when there is no validation data."""
        assert self.val_dataset is not None, "call setup() first"
        if len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.cfg.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )
