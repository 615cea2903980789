"""What a run with several processes records: numbers summed, averaged or listed across ranks.

Under DDP, FSDP or DeepSpeed each rank sees its own share of every batch, its own tokens and its
own memory; the run record (written by rank 0 alone) must speak for all of them. ``across_ranks``
is one collective at the end of ``fit``, called by every rank: the training loss per batch
averaged over ranks (the loss whose gradient DDP applies), the real tokens summed (tokens/s over
the slowest rank's training time), each rank's peak memory with its maximum and sum, and the
global batch. With one process it computes the same fields without communicating.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

MEMORY_FIELDS = ("peak_rss_mb", "peak_anon_mb", "peak_gpu_mb")


def check_rank_zero(what: str) -> None:
    """Refuse a run record written by a rank other than 0: the ranks are one run, and a second
    writer would race rank 0 for the same file (the global rank is Lightning's, set from the
    launcher's environment before any model loads)."""
    from pytorch_lightning.utilities import rank_zero_only

    rank = getattr(rank_zero_only, "rank", 0)
    if rank != 0:
        raise RuntimeError(f"rank {rank} tried to write {what}; a run's records and artifacts are written by rank 0 alone")


def _gather(trainer: Any, values: Sequence[float]) -> list[list[float]]:
    """``values`` of every rank, in rank order (NaN stands for a missing value)."""
    tensor = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)
    if trainer.world_size <= 1 or not dist.is_available() or not dist.is_initialized():
        return [tensor.tolist()]
    tensor = tensor.to(trainer.strategy.root_device)  # nccl gathers GPU tensors, gloo CPU ones
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return [part.cpu().tolist() for part in parts]


def _number(value: float) -> Optional[float]:
    return None if value != value else round(value, 1)  # NaN: the rank had no such number


def memory_summary(per_rank: dict[str, list[Optional[float]]]) -> dict[str, Any]:
    """``{field: {"ranks": [...], "max": ..., "sum": ...}}`` for each memory field some rank measured."""
    out: dict[str, Any] = {}
    for name, values in per_rank.items():
        known = [v for v in values if v is not None]
        if known:
            out[name] = {"ranks": values, "max": round(max(known), 1), "sum": round(sum(known), 1)}
    return out


def across_ranks(trainer: Any, *, tokens: int, seconds: float, losses: Sequence[float],
                 memory: Any = None, batch_size: int) -> dict[str, Any]:
    """The run record's fields that every rank contributes to (every rank must call this)."""
    world = int(trainer.world_size)
    peaks = [getattr(memory, name, None) if memory is not None else None for name in MEMORY_FIELDS]
    rows = _gather(trainer, [tokens, seconds, len(losses), *peaks])
    total_tokens = int(round(sum(row[0] for row in rows)))
    slowest = max(row[1] for row in rows)
    mean_losses = list(losses)
    if world > 1 and losses and len({row[2] for row in rows}) == 1:  # the same batch count on every rank
        table = _gather(trainer, losses)
        mean_losses = [sum(column) / len(column) for column in zip(*table)]
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    per_rank = {name: [_number(row[3 + i]) for row in rows] for i, name in enumerate(MEMORY_FIELDS)}
    return {
        "world_size": world,
        "num_nodes": int(getattr(trainer, "num_nodes", 1) or 1),
        "strategy": type(trainer.strategy).__name__,
        "batch_size_per_rank": batch_size,
        "global_batch_size": batch_size * accumulate * world,  # examples per optimizer step, all ranks
        "train_tokens": total_tokens,
        "tokens_per_s": round(total_tokens / slowest, 1) if slowest > 0 else 0.0,
        "train_losses": [round(x, 6) for x in mean_losses],
        "memory_per_rank": memory_summary(per_rank),
    }


def final_peaks(record: dict[str, Any], memory: Any) -> None:
    """With several ranks, ``record``'s top-level peaks become the largest rank's, rank 0's own
    measured to the end of the run (``across_ranks`` gathered them before its saving and scoring)."""
    per_rank = record.get("memory_per_rank")
    if not per_rank or int(record.get("world_size") or 1) <= 1:
        return
    values = {}
    for name, entry in per_rank.items():
        ranks, mine = list(entry["ranks"]), getattr(memory, name, None)
        if mine is not None and ranks:
            ranks[0] = _number(max(mine, ranks[0] or 0.0))
        values[name] = ranks
    record["memory_per_rank"] = memory_summary(values)
    record.update({name: entry["max"] for name, entry in record["memory_per_rank"].items()})
