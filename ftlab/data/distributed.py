"""Each rank's share of the training order, so that N processes train on the batches one process would.

Lightning's default under DDP replaces the loader's sampler with a ``DistributedSampler`` that
draws its own permutation (seeded by ``PL_GLOBAL_SEED``), so a two-process run sees other
batches than a one-process run with the same global batch, and the two cannot be compared.
``RankShareSampler`` draws the very permutation the one-process loader draws (``torch.randperm``
from the loader's own generator, as ``RandomSampler`` does) and gives rank ``r`` of ``W`` the positions ``r, r + W, r + 2W, ...``. With a
per-rank batch of ``B``, optimizer step ``k`` then trains on positions ``kWB .. (k+1)WB - 1`` of
the permutation across all ranks: exactly the batch of one process with batch size ``WB``.
Being a ``DistributedSampler``, Lightning leaves it in place.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sized

import torch
from torch.utils.data import DistributedSampler


class RankShareSampler(DistributedSampler):
    """One rank's strided share of a permutation drawn from ``generator`` (as ``RandomSampler``
    draws it). When the dataset does not divide by the ranks, the first positions are repeated
    at the end, as ``DistributedSampler`` does, so every rank runs as many batches."""

    def __init__(self, dataset: Sized, generator: torch.Generator, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=False)  # type: ignore[arg-type]
        self.generator: Optional[torch.Generator] = generator

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=self.generator).tolist()
        order += order[: self.total_size - n]
        yield from order[self.rank : self.total_size : self.num_replicas]
        # RandomSampler draws one more (unused) permutation once its epoch is exhausted; so does
        # this, so that the next epoch's order is one process's next epoch too
        torch.randperm(n, generator=self.generator)
