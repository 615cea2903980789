"""Per-run record: ``metrics.json`` in every run folder, written atomically, on success and failure."""

from __future__ import annotations

import json
import math
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ftlab.cache import atomic_write_json

METRICS_FILE = "metrics.json"


def _current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; falls back to the process peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> dict[str, float]:
    """This process's resident memory now, split as the kernel counts it (``/proc/self/status``):
    ``anon`` is what the process allocated (tensors, optimizer state, activations), ``file`` the
    pages of mapped files it touched (safetensors weights read through mmap, shared libraries),
    which the kernel can drop and read again under pressure. Empty where /proc has no split."""
    fields = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    found[fields[key]] = int(value.split()[0]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return {}
    return found


class PeakMemory:
    """Peak RSS, its anonymous and file-backed parts, and peak GPU memory while the block runs.

    Sampled in a thread rather than read from ``ru_maxrss``, because jobs of a sweep share one
    process and the process-wide peak would carry one job's memory into the next one's record.
    ``peak_anon_mb`` is what a run needs; ``peak_rss_mb`` also counts touched pages of mapped
    weight files, which can be most of it right after a quantized load and are reclaimable.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_rss_mb = 0.0
        self.peak_anon_mb: Optional[float] = None
        self.peak_file_mb: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _measure(self) -> None:
        self.peak_rss_mb = max(self.peak_rss_mb, _current_rss_mb())
        parts = resident_mb()
        if "anon" in parts:
            self.peak_anon_mb = max(self.peak_anon_mb or 0.0, parts["anon"])
        if "file" in parts:
            self.peak_file_mb = max(self.peak_file_mb or 0.0, parts["file"])

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._measure()
            self._stop.wait(self.interval_s)

    @property
    def peak_gpu_mb(self) -> Optional[float]:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated() / 2**20

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._measure()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._measure()


def loss_summary(losses: list[float]) -> dict[str, Optional[float]]:
    """First/last training loss as means over the first/last 10% of steps (at least one), so a
    single noisy batch does not decide whether the loss fell."""
    if not losses:
        return {"train_loss_first": None, "train_loss_last": None}
    k = max(1, len(losses) // 10)
    return {
        "train_loss_first": sum(losses[:k]) / k,
        "train_loss_last": sum(losses[-k:]) / k,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.item() if value.numel() == 1 else value.tolist())
    return value


def write_json(path: Path, obj: dict[str, Any]) -> Path:
    """Write a JSON record atomically: a crash mid-write never leaves a half file behind
    (non-finite floats become null and tensors numbers, so the record is strict JSON)."""
    return atomic_write_json(path, _json_safe(obj))


def write_metrics(directory: Path, metrics: dict[str, Any]) -> Path:
    """Write the run record ``metrics.json`` (atomically; rank 0 alone)."""
    from ftlab.ranks import check_rank_zero

    check_rank_zero(METRICS_FILE)
    return write_json(Path(directory) / METRICS_FILE, metrics)


def read_metrics(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / METRICS_FILE).read_text())


def folder_mb(folder: Path, pattern: str = "*") -> float:
    """Size on disk of the files in ``folder`` matching ``pattern`` (the saved weights)."""
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file()) / 2**20


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
