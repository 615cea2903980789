"""Pack several short encoded examples into one sequence so batches carry less padding.

Why: chat examples vary a lot in length, so right-padded batches spend much of their compute on
pad tokens. Packing fills each sequence of up to ``max_length`` tokens with whole examples, and
the model must still see every example alone: no token may attend to another example.

How the model keeps examples apart: transformers' ``masking_utils.create_causal_mask`` builds a
block-diagonal causal mask by itself (``find_packed_sequence_indices``) when the forward gets
``position_ids`` that restart at 0 for every example, no ``attention_mask`` and no cache. A
Llama-style forward creates a ``DynamicCache`` whenever ``use_cache`` resolves to true (the
config's default, even in training), and a cache switches that detection off, silently letting
examples attend to each other. So ``PackedCollator`` returns ``use_cache=False`` next to the
tensors: ``FineTuneModule`` and ``BaseMethod.loss`` call ``model(**batch)``, Lightning moves only
the tensors of a batch to the device and leaves the bool as it is, and the batch stays correct
whatever the model's config says.

What cannot take packed batches: PEFT prompt learning (prompt, prefix, p-tuning) drops
``position_ids`` with only a warning and adds virtual tokens or a cache, so examples would see
each other; sequence-classification heads read one token per row. ``flash_attention_2`` detects
packing only in a single flattened row (``_is_packed_sequence`` needs batch size 1), so these
batches of several rows need the ``sdpa`` (default), ``eager`` or ``flex_attention`` masks.

The first label of every example is set to -100. After the causal shift it would be predicted
from the previous example's last token; in an unpacked batch it is never a target either, so
the loss (the mean over labelled targets) is the same packed or not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch

from ftlab.data.chat_masking import IGNORE_INDEX
from ftlab.errors import ConfigError

__all__ = ["PackedCollator", "PackingStats", "pack", "real_tokens"]


@dataclass
class PackingStats:
    """How much padding packing saves, counted for batches of ``batch_size`` rows."""

    examples: int
    sequences: int
    tokens: int  # real tokens
    padded_tokens_unpacked: int  # examples in order, batch_size a batch, padded to its longest
    padded_tokens_packed: int  # packed sequences in order, same batch_size

    @property
    def padding_removed(self) -> float:
        """Share of the unpacked batches' padding that packing removed (0 when there was none)."""
        if self.padded_tokens_unpacked == 0:
            return 0.0
        return 1.0 - self.padded_tokens_packed / self.padded_tokens_unpacked

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "padding_removed": self.padding_removed}


def _padding(lengths: Sequence[int], batch_size: int) -> int:
    """Pad tokens when ``lengths`` are batched in order and each batch is padded to its longest."""
    total = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        total += max(chunk) * len(chunk) - sum(chunk)
    return total


def _check(index: int, example: Mapping[str, Sequence[int]], max_length: int) -> None:
    ids, labels = example["input_ids"], example["labels"]
    if len(ids) != len(labels):
        raise ValueError(f"example {index}: {len(ids)} input_ids but {len(labels)} labels")
    if not 0 < len(ids) <= max_length:
        raise ValueError(
            f"example {index} has {len(ids)} tokens; packing needs 1..max_length={max_length}"
            " (truncate examples when encoding them)"
        )
    mask = example.get("attention_mask")
    if mask is not None and not all(mask):
        raise ValueError(f"example {index} is already padded (attention_mask has zeros); pack unpadded examples")
    if all(label == IGNORE_INDEX for label in labels[1:]):
        # it would add nothing to the loss, and real_tokens tells a row's pad tail from its last
        # example by the tail having no label
        raise ValueError(f"example {index} has no labelled token after its first; drop it before packing")


def pack(
    examples: Sequence[Mapping[str, Sequence[int]]], max_length: int, batch_size: int
) -> tuple[list[dict[str, list[int]]], PackingStats]:
    """Greedy first-fit in input order (deterministic): each example goes into the first packed
    sequence with room for it. Returns sequences of ``input_ids``, ``labels`` and
    ``position_ids`` (0.. per example) and the padding statistics."""
    if max_length < 1 or batch_size < 1:
        raise ConfigError(f"max_length and batch_size must be >= 1, got {max_length} and {batch_size}")
    sequences: list[dict[str, list[int]]] = []
    free: list[int] = []  # room left in each sequence
    for index, example in enumerate(examples):
        _check(index, example, max_length)
        n = len(example["input_ids"])
        slot = next((i for i, room in enumerate(free) if room >= n), None)
        if slot is None:
            sequences.append({"input_ids": [], "labels": [], "position_ids": []})
            free.append(max_length)
            slot = len(sequences) - 1
        seq = sequences[slot]
        seq["input_ids"].extend(example["input_ids"])
        seq["labels"].append(IGNORE_INDEX)
        seq["labels"].extend(example["labels"][1:])
        seq["position_ids"].extend(range(n))
        free[slot] -= n
    lengths = [len(ex["input_ids"]) for ex in examples]
    stats = PackingStats(
        examples=len(lengths),
        sequences=len(sequences),
        tokens=sum(lengths),
        padded_tokens_unpacked=_padding(lengths, batch_size),
        padded_tokens_packed=_padding([len(s["input_ids"]) for s in sequences], batch_size),
    )
    return sequences, stats


class PackedCollator:
    """Right-pad packed sequences: ``pad_id`` in input_ids, -100 in labels, and position ids
    0, 1, 2, ... for the pad tail, so it forms a block of its own (no real token attends to pad,
    pad attends to nothing real). No ``attention_mask``, and ``use_cache=False`` (module doc)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        width = max(len(seq["input_ids"]) for seq in batch)
        ids, labels, positions = [], [], []
        for seq in batch:
            tail = width - len(seq["input_ids"])
            ids.append(list(seq["input_ids"]) + [self.pad_id] * tail)
            labels.append(list(seq["labels"]) + [IGNORE_INDEX] * tail)
            positions.append(list(seq["position_ids"]) + list(range(tail)))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "use_cache": False,
        }


def real_tokens(batch: Mapping[str, Any]) -> int:
    """Non-padding tokens of a batch from ``PadCollator`` (attention_mask ones), the pair and
    prompt collators (the ones of every ``*_attention_mask``) or ``PackedCollator``; a batch
    with neither a mask nor position ids counts every token.

    A packed row's pad tail is its last position block (position ids restart at 0) when that
    block has no label: ``pack`` refuses examples without a label after their first token, so
    a real example never looks like that.
    """
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    masks = [value for key, value in batch.items() if key.endswith("_attention_mask")]
    if masks:  # a preference pair (chosen_*, rejected_*) or a prompt batch: every side's tokens
        return int(sum(m.sum() for m in masks))
    ids = batch["input_ids"]
    positions, labels = batch.get("position_ids"), batch.get("labels")
    if positions is None or labels is None:
        return int(ids.numel())
    positions = positions.expand_as(ids)
    index = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    last_start = torch.where(positions == 0, index, 0).amax(dim=-1, keepdim=True)
    in_last = index >= last_start
    tail_is_pad = ~((labels != IGNORE_INDEX) & in_last).any(dim=-1, keepdim=True)
    return int(ids.numel() - (in_last & tail_is_pad).sum())
