"""``trainer.precision=auto``: bf16 mixed precision where bf16 matmuls are native, fp32 elsewhere.

The same rule as the 4-bit compute dtype (``quantization.bnb_4bit_compute_dtype=auto``): a
bf16-capable GPU, or a CPU with AVX512-BF16 or AMX, trains in ``bf16-mixed`` (measured on a
2-core AVX512-BF16 CPU, LoRA on SmolLM2-135M: 1.43x the tokens/s of fp32); anywhere else bf16 is
emulated (about 20x slower than fp32 on an AVX2 CPU), so ``32-true`` it is. Any explicit
Lightning precision is passed through unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from ftlab.models.quant import native_bf16

AUTO = "auto"


def training_device(accelerator: Any) -> str:
    """``cuda`` or ``cpu``: where Lightning's ``accelerator`` setting puts training (``auto``
    picks a GPU when there is one, as Lightning does); anything else (``mps``, ``tpu``) as named."""
    name = str(accelerator or AUTO).lower()
    if name == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name in ("gpu", "cuda") else name


def resolve_precision(precision: Any, accelerator: Any = AUTO) -> Any:
    """Lightning's precision for ``trainer.precision``: ``auto`` becomes ``bf16-mixed`` where bf16
    is native on the training device and ``32-true`` elsewhere; other values are kept."""
    if str(precision).lower() != AUTO:
        return precision
    return "bf16-mixed" if native_bf16(training_device(accelerator)) else "32-true"
