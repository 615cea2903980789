"""The one LightningModule every method trains through.

Methods differ only in what they do to the model (``apply``) and in the hooks of
``ftlab.methods.base.BaseMethod``; the loop, logging and optimizer wiring are shared here.

Per optimizer step ``k`` (``global_step`` = the steps completed before it), Lightning's order with
the method's hooks is: ``on_train_step_start(model, optimizer, k)`` (from ``on_train_batch_start``
of the first batch of the accumulation window), then for each batch of the window ``loss``,
``zero_grad`` (first batch only) and backward, then ``optimizer.step()`` and
``on_step_end(model, k)``. What the method logs during training goes to Lightning's
``self.log("method/<name>")`` and its last value into ``method_metrics``, for ``metrics.json``.
``before_training(model, batches)`` runs once per ``fit``, in ``on_train_start`` (after the
optimizer is built and the model is on its device, before step 0), with the training batches in
order. Validation logs each of the method's ``validation_metrics`` as ``val/<name>`` (the epoch's
mean, weighted by batch size); their names are kept in ``validation_names``, for ``metrics.json``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ftlab.evaluation.classification import ClassificationMetrics
from ftlab.errors import MethodError
from ftlab.guards import check_finite_loss
from ftlab.methods.base import BaseMethod, batch_size
from ftlab.models.quant import keep_standard_4bit_layout


class FineTuneModule(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        method: BaseMethod,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[..., Any]] = None,
        labels: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained leaves eval mode: dropout would stay off
        self.method = method
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_losses: list[float] = []  # one per training batch, for metrics.json
        # classification: accuracy/precision/recall/F1 of the last validation, for metrics.json
        self.metrics = ClassificationMetrics(labels) if labels is not None else None
        self.classification_metrics: dict[str, Any] = {}
        # what the method logged during training: the last value of each name, for metrics.json
        self.method_metrics: dict[str, float] = {}
        # the names of the method's validation_metrics, logged as val/<name>, in the order given
        self.validation_names: list[str] = []
        self._step_started = -1  # the global_step whose on_train_step_start has run
        method._log_sink = self._log_method_metric

    def _log_method_metric(self, name: str, value: float) -> None:
        """``BaseMethod.log``'s destination: kept and logged while the training loop runs, dropped
        otherwise (validation, generation, before or after ``fit``)."""
        trainer = self._trainer
        if trainer is None or not trainer.training:
            return
        self.method_metrics[name] = value
        self.log(f"method/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    def on_fit_start(self) -> None:
        self._step_started = -1  # a second fit starts its steps over
        # a model built outside ftlab.models.loading.load_model (a plugin's own) is guarded here too
        keep_standard_4bit_layout(self.model)

    def on_train_start(self) -> None:
        self.method.before_training(self.model, self._training_batches())

    def _training_batches(self) -> Iterator[Mapping[str, torch.Tensor]]:
        """Every training batch once, in the data's order, on the model's device: a fresh
        unshuffled loader over the data module's training set (iterating the shuffled one would
        advance its generator and change the order training sees), else the trainer's own loader."""
        from pytorch_lightning.utilities import move_data_to_device
        from torch.utils.data import DataLoader

        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None)
        collate = getattr(datamodule, "train_collator", None)
        if dataset is not None and collate is not None:
            loader: Any = DataLoader(dataset, batch_size=datamodule.cfg.batch_size, shuffle=False, collate_fn=collate)
        else:
            loader = self.trainer.train_dataloader
            loader = getattr(loader, "flattened", [loader])[0]  # Lightning's CombinedLoader holds the user's
        for batch in loader:
            yield move_data_to_device(batch, self.device)

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # once per optimizer step: on the first batch of its accumulation window, before its forward
        # (global_step only moves after the window's optimizer step)
        if self.global_step != self._step_started:
            self._step_started = self.global_step
            optimizer = self.optimizers(use_pl_optimizer=False)
            self.method.on_train_step_start(self.model, optimizer, self.global_step)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.method.loss(self.model, batch)
        # a nan/inf loss stops the run (DivergedError, one line), whatever the divergence settings
        self.train_losses.append(check_finite_loss(loss, self.global_step, getattr(self.method.config, "lr", None)))
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch_size(batch))
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        size = batch_size(batch)
        if self.metrics is not None:  # one forward gives the loss and the logits the metrics need
            outputs = self.model(**self.method.model_inputs(batch))
            self.metrics.update(outputs.logits.detach(), batch["labels"])
            self.log("val/loss", outputs.loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=size)
            if "loss" not in self.validation_names:
                self.validation_names.append("loss")
            return outputs.loss
        values = dict(self.method.validation_metrics(self.model, batch))
        if "loss" not in values:
            raise MethodError(f"method '{self.method.config.name}': validation_metrics returned {sorted(values)}, "
                              "without 'loss' (val/loss, the run's validation loss)")
        for name, value in values.items():
            number = self.method.metric_value(name, value)
            self.log(f"val/{name}", number, on_epoch=True, prog_bar=name == "loss", sync_dist=True, batch_size=size)
            if name not in self.validation_names:
                self.validation_names.append(name)
        return values["loss"]

    def on_validation_epoch_end(self) -> None:
        if self.metrics is None:
            return
        metrics = self.metrics.compute()  # over the whole validation set (all ranks)
        self.metrics.reset()
        self.classification_metrics = metrics
        for name in ("accuracy", "precision", "recall", "f1"):
            self.log(f"val/{name}", metrics[name], prog_bar=name in ("accuracy", "f1"), rank_zero_only=True)
        for label, values in metrics["per_class"].items():
            self.log(f"val/f1/{label}", values["f1"], rank_zero_only=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.method.on_step_end(self.model, self.global_step)

    def configure_optimizers(self) -> Any:
        groups = self.method.parameter_groups(self.model, self.method.config.lr)
        # groups may hold frozen parameters (a method that unfreezes them later), never only those
        groups = [{**g, "params": [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])}
                  for g in groups]
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise MethodError(f"method '{self.method.config.name}' left no trainable parameter")
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, num_training_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
