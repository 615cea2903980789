"""``manifest.json``: what exactly ran, so a run can be repeated and its numbers trusted later.

Written into every run folder when the run starts (and completed with the data's fingerprint once
the data is prepared): the command line and overrides, the resolved config, the seed, ftlab's
version and git commit, the versions of the libraries that decide the numbers, the data's
fingerprint and the hardware (CPU model and the flags that change code paths, GPUs).
``ftlab rerun RUN_DIR`` repeats a run from it and names what differs on this machine.
"""

from __future__ import annotations

import copy
import functools
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

import ftlab

__all__ = ["MANIFEST_FILE", "PACKAGES", "data_fingerprint", "environment", "read_manifest", "write_manifest"]

MANIFEST_FILE = "manifest.json"
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "pytorch-lightning", "hydra-core", "omegaconf",
            "accelerate", "safetensors", "tokenizers", "datasets", "numpy")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")  # flags that change kernels taken


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git() -> Optional[dict[str, Any]]:
    """ftlab's own commit when it runs from a git checkout (an editable install), else None."""
    root = Path(ftlab.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def _cpu() -> dict[str, Any]:
    from ftlab.models.quant import cpu_flags

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return {"model": model or platform.processor() or None, "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


@functools.lru_cache(maxsize=1)
def _environment() -> dict[str, Any]:
    """Versions and hardware: the part of a manifest that describes the machine, not the run.
    The same for every run of a process (a sweep's jobs), so found once (git, /proc, metadata)."""
    import torch

    return {
        "ftlab": ftlab.__version__,
        "git": _git(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "hardware": {"cpu": _cpu(), "gpus": _gpus(), "cuda": torch.version.cuda, "platform": platform.platform()},
    }


def environment() -> dict[str, Any]:
    """``_environment()``, as a copy the caller may change."""
    return copy.deepcopy(_environment())


def write_manifest(out: Path, cfg: DictConfig, overrides: list[str], data: Optional[dict[str, Any]] = None) -> Path:
    """Write ``out/manifest.json`` (atomically; rank 0 alone)."""
    from ftlab.ranks import check_rank_zero
    from ftlab.results import write_json

    check_rank_zero(MANIFEST_FILE)

    manifest = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "overrides": list(overrides),
        "seed": cfg.get("seed"),
        **environment(),
        "data": data,
        "config": OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False),
    }
    return write_json(Path(out) / MANIFEST_FILE, manifest)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((Path(run_dir) / MANIFEST_FILE).read_text())


def data_fingerprint(datamodule: Any) -> dict[str, Any]:
    """The prepared data's identity: a hash of each split's examples and their counts."""
    from ftlab.data.cache import rows_fingerprint

    train, val = list(datamodule.train_records), list(datamodule.val_records)
    return {"train": rows_fingerprint(train), "validation": rows_fingerprint(val),
            "train_examples": len(train), "val_examples": len(val)}
