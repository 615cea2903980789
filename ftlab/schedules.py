"""Learning-rate schedules with warm-up, sized at fit time from the real number of steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler

from ftlab.errors import ConfigError


def warmup_schedule(
    optimizer: Optimizer, num_training_steps: int, name: str = "cosine", warmup_ratio: float = 0.1
) -> LRScheduler:
    """transformers' named schedule with ``warmup_ratio`` of the steps as linear warm-up.

    A ratio (not a step count) keeps one scheduler config right for a 5-step smoke run and a
    5000-step run alike.
    """
    if not 0.0 <= warmup_ratio < 1.0:
        raise ConfigError(f"scheduler.warmup_ratio={warmup_ratio} must be in [0, 1)")
    warmup = math.ceil(warmup_ratio * num_training_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps)
