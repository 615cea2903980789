"""A training DataLoader that can continue mid-epoch where a checkpoint left it.

Shuffling draws from the loader's generator when an epoch's iterator is made (a base seed, then
the permutation), so the generator's state at that moment decides the whole epoch's order. The
loader keeps that state (``epoch_start_state``); a checkpoint stores it with the number of batches
already trained on (``ftlab.checkpoints.ResumeState``), and ``resume_at`` makes the next epoch
start from that state and skip those batches: the same batches, in the same order, as a run that
was never interrupted. Skipped batches are drawn through the loader's own iterator (loading them
costs milliseconds, no model step), so the sampler, its DDP replacement and worker seeds see
exactly the draws of a full epoch.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader

__all__ = ["ResumableLoader"]


class ResumableLoader(DataLoader):
    """``DataLoader`` (shuffled, with its own ``generator``) that records each epoch's starting
    generator state and can resume an epoch after its first ``skip`` batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_start_state: Optional[torch.Tensor] = None
        self._resume: Optional[tuple[torch.Tensor, int]] = None

    def resume_at(self, generator_state: Optional[torch.Tensor], skip: int) -> None:
        """The next epoch starts from ``generator_state`` (when given) and leaves out ``skip`` batches."""
        if generator_state is not None or skip:
            self._resume = (generator_state, int(skip))

    def __iter__(self) -> Iterator[Any]:
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            if state is not None and self.generator is not None:
                self.generator.set_state(state)
        if self.generator is not None:
            self.epoch_start_state = self.generator.get_state().clone()
        batches = super().__iter__()
        for _ in range(skip):  # drawn and dropped: the same sampler draws, worker seeds and order as a full epoch
            next(batches, None)
        return batches
