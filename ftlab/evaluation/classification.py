"""Validation metrics of a classification run: accuracy, precision, recall and F1.

torchmetrics keeps the running confusion counts across batches (and syncs them across DDP
ranks), so the numbers are those of the whole validation set, not a mean of per-batch values.
Precision, recall and F1 are given macro-averaged (every class weighs the same, which is what
matters when classes are unbalanced) and per class.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassStatScores,
)

__all__ = ["ClassificationMetrics", "is_classifier"]


def is_classifier(model: nn.Module) -> bool:
    """Whether a (possibly PEFT-wrapped) model is a sequence classifier."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(inner).__name__.endswith("ForSequenceClassification")


class ClassificationMetrics(nn.Module):
    """Accumulates predictions over a validation pass; ``compute()`` gives the flat metric dict."""

    def __init__(self, labels: Sequence[str]) -> None:
        super().__init__()
        self.labels = list(labels)
        n = len(self.labels)
        self.macro = MetricCollection({
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "precision": MulticlassPrecision(n, average="macro"),
            "recall": MulticlassRecall(n, average="macro"),
            "f1": MulticlassF1Score(n, average="macro"),
        })
        self.per_class = MetricCollection({
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
            "f1": MulticlassF1Score(n, average=None),
        })
        self.stats = MulticlassStatScores(n, average=None)  # its last column is each class's support

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        preds = logits.argmax(-1)
        self.macro.update(preds, target)
        self.per_class.update(preds, target)
        self.stats.update(preds, target)

    def compute(self) -> dict[str, Any]:
        """``{"accuracy", "precision", "recall", "f1", "per_class": {label: {...}}}``."""
        macro = {k: float(v) for k, v in self.macro.compute().items()}
        per = self.per_class.compute()
        support = self.stats.compute()[:, -1]
        per_class = {
            label: {k: float(per[k][i]) for k in ("precision", "recall", "f1")} | {"support": int(support[i])}
            for i, label in enumerate(self.labels)
        }
        return macro | {"per_class": per_class}

    def reset(self) -> None:
        self.macro.reset()
        self.per_class.reset()
        self.stats.reset()
