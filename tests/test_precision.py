"""trainer.precision=auto: bf16 mixed precision where bf16 is native, fp32 elsewhere.

The choice is checked, not the speed: with the CPU's flags and CUDA's answers replaced, and on
this machine end to end against its own /proc/cpuinfo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftlab.models import quant
from ftlab.precision import resolve_precision


def fake_machine(monkeypatch: pytest.MonkeyPatch, flags: set[str], cuda: bool = False, cuda_bf16: bool = False) -> None:
    monkeypatch.setattr(quant, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bf16-mixed"),
    ({"avx2", "avx512f"}, "32-true"),  # AVX-512 without its bf16 instructions: bf16 is emulated
    ({"avx2"}, "32-true"),
    (set(), "32-true"),  # no /proc/cpuinfo
])
def test_auto_on_cpus(monkeypatch: pytest.MonkeyPatch, flags: set[str], expected: str) -> None:
    fake_machine(monkeypatch, flags)
    assert resolve_precision("auto", "auto") == expected
    assert resolve_precision("auto", "cpu") == expected


@pytest.mark.parametrize("cuda_bf16, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_gpus(monkeypatch: pytest.MonkeyPatch, cuda_bf16: bool, expected: str) -> None:
    fake_machine(monkeypatch, {"avx2"}, cuda=True, cuda_bf16=cuda_bf16)
    assert resolve_precision("auto", "auto") == expected
    assert resolve_precision("auto", "gpu") == expected
    assert resolve_precision("auto", "cuda") == expected
    # trainer=cpu on a GPU machine trains on the CPU: its flags decide
    assert resolve_precision("auto", "cpu") == "32-true"


def test_explicit_precision_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_machine(monkeypatch, {"avx512_bf16"})
    for value in ("32-true", "bf16-true", "16-mixed", 32):
        assert resolve_precision(value, "cpu") == value


def cpuinfo_flags() -> set[str]:
    """The flags line of /proc/cpuinfo, read here rather than through ftlab."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_default_run_records_the_choice_for_this_machine(tiny_cfg) -> None:
    """A default run (no trainer.precision) trains in the precision this machine's CPU calls for,
    and metrics.json says which."""
    from ftlab.results import read_metrics
    from ftlab.train import train

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the CPU rule is not the one that applies")
    cfg = tiny_cfg("trainer.precision=auto", "eval.num_samples=0", steps=1)
    train(cfg)
    native = bool(cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})
    record = read_metrics(Path(cfg.paths.output_dir))
    assert record["train_precision"] == ("bf16-mixed" if native else "32-true")


def test_composed_default_is_auto() -> None:
    from ftlab.config import compose

    assert compose([]).trainer.precision == "auto"
