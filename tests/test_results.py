"""PeakMemory tells what a run allocated (anonymous memory) from the pages of mapped files it
touched (weights read through mmap), which the kernel can drop: the two are recorded apart."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import pytest
import torch

from ftlab.results import PeakMemory, resident_mb

MB = 2**20
pytestmark = pytest.mark.skipif(not resident_mb(), reason="no RssAnon/RssFile in /proc/self/status here")


def test_reading_a_mapped_file_counts_as_file_backed_not_allocated(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x01" * (256 * MB))
    with PeakMemory(interval_s=0.01) as memory, open(path, "rb") as f:
        before = resident_mb()
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        total = sum(mapped[i] for i in range(0, len(mapped), 4096))  # touch every page
        after = resident_mb()
        time.sleep(0.1)  # held a while, as a run holds its weights: the 10 ms sampler sees it
        mapped.close()
    assert total == len(range(0, 256 * MB, 4096))
    # the page cache may already hold the file: what rose is this process's file-backed share
    assert after["file"] - before["file"] > 200
    assert after["anon"] - before["anon"] < 50
    # sampled every 10 ms while the pages were touched (which takes far longer)
    assert memory.peak_file_mb > before["file"] + 200 and memory.peak_anon_mb < after["anon"] + 50


def test_an_allocated_tensor_counts_as_anonymous() -> None:
    """The control: the same size allocated and written is anonymous memory."""
    with PeakMemory(interval_s=0.01) as memory:
        before = resident_mb()
        block = torch.ones(256 * MB // 4)  # float32: 256 MB, every page written
        after = resident_mb()
        time.sleep(0.1)
        del block
    assert after["anon"] - before["anon"] > 200
    assert memory.peak_anon_mb > before["anon"] + 200
    assert memory.peak_rss_mb >= memory.peak_anon_mb
