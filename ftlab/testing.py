"""The method contract: checks every method, built-in or third-party, must pass.

They run on ``model=tiny`` (a random 2-layer Llama) on CPU, in seconds per method, through the
same config composition and model loading as a real run. In a plugin's test file::

    from ftlab.testing import MethodContract

    class TestMyMethod(MethodContract):
        method = "my_method"            # the registered entry-point (or preset) name
        overrides = ("method.r=4",)     # optional extra config overrides

Each check can fail: ``tests/methods/test_contract_controls.py`` runs it on a deliberately broken method
and shows it does. A check that does not apply to a method is reported as skipped with the
reason, never as passed. What each check guarantees:

- ``check_trainable``: ``apply`` leaves at least one parameter to train.
- ``check_base_frozen``: unless the method says ``trains_base`` (then: skipped), no parameter of
  the loaded base model requires grad after ``apply`` (matched by identity, so wrapped layers
  count too).
- ``check_steps_change_only_trainable``: ``CHANGE_STEPS`` optimizer steps through the method's
  own ``parameter_groups``, ``on_train_step_start``, ``loss`` and ``on_step_end`` change every
  parameter that required grad at the forward of some step and no other one (AdamW without
  weight decay, so an untouched parameter stays bit-identical; two steps, because LoRA's A gets a
  gradient only once B has left zero).
- ``check_loss_falls``: at the method's own learning rate the loss on one fixed batch falls by at
  least ``LOSS_MIN_DROP`` (relative) within ``LOSS_MAX_STEPS`` steps (measured in eval mode,
  without dropout, every ``LOSS_ROUND`` steps).
- ``check_save_load``: once training has moved the logits by at least ``MIN_EFFECT`` (so that
  dropping what trained would show), ``save`` then ``load`` onto a freshly loaded base gives the
  same logits (``SAVE_LOAD_ATOL``).
- ``check_merge``: after the same minimum effect, a method that can merge gives a plain
  transformers model with no PEFT or bitsandbytes module left and the same logits
  (``MERGE_ATOL``; on a quantized base, those of the model computing with its dequantized
  weights, since int8 inference also quantizes activations); a method with ``cannot_merge`` refuses with a MethodError giving its reason;
  a method whose trained model already is the plain model (full, freeze) is skipped.
- ``check_training_hooks``: a real Lightning run through ftlab's training module
  (``HOOK_STEPS`` optimizer steps of ``HOOK_ACCUMULATE`` batches each) calls
  ``on_train_step_start(model, optimizer, k)`` then ``on_step_end(model, k)`` once per optimizer
  step ``k = 0, 1, ...``, with the model that trains and the run's optimizer; after
  ``on_train_step_start`` every parameter that requires grad is held by that optimizer (a method
  that unfreezes parameters later returns them from ``parameter_groups``); and every metric the
  method declares in ``metrics`` was logged during training, reaching the run's logger as
  ``method/<name>`` and the training module's ``method_metrics`` (``metrics.json``'s
  ``method_metrics`` is written from it).
- ``check_validation_metrics``: ``validation_metrics`` (eval mode, no gradients) returns one number
  per valid name, among them ``loss``, equal to ``loss(model, batch)`` in eval mode; and (in
  ``check_training_hooks``) a Lightning validation through the training module logs each as
  ``val/<name>``, and ``before_training`` ran once per fit, before step 0, with the model that
  trains and every training batch.
- ``check_batch_kind_and_head``: the fixed batch is of the method's ``batch_kind`` (``preference``:
  pairs from ``data=preference``, encoded by the data module with ``pairs=True``, so every other
  check runs on pairs), and the model's output is its ``head`` (a reward head: one per sequence).
- ``check_quantized_base``: on each quantized base the method claims (``nf4``, ``fp4``, ``int8``;
  the others are skipped), the base really is held quantized, stays frozen, and the steps,
  save/load and merge checks hold there too.
- ``check_quantized_gradients``: on each quantized base the method claims, the gradients of its
  trainable parameters match those of the same model with every quantized layer replaced by a
  float ``nn.Linear`` holding the dequantized weights (``GRAD_RTOL``), before and after an
  eval-mode pass (bitsandbytes' CPU inference repack dropped those gradients).

For a method's own tests: ``train_steps(run, steps)`` takes optimizer steps on the fixed batch
through every hook in a run's order and returns the optimizer (``make_optimizer(run)``) to
continue with or to inspect.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
import torch
from omegaconf import DictConfig
from pytorch_lightning import Callback
from pytorch_lightning.loggers import Logger
from torch import nn

from ftlab.config import compose, task_of
from ftlab.errors import ConfigError, MethodError
from ftlab.methods.base import BaseMethod

CHANGE_STEPS = 2
LOSS_ROUND = 8
LOSS_MAX_STEPS = 64
LOSS_MIN_DROP = 1e-3  # 0.1% of the starting loss; float noise is ~1e-7
MIN_EFFECT = 1e-3  # max |logit change| training must reach before equality checks: 10x MERGE_ATOL
EFFECT_ROUND = 2
EFFECT_MAX_STEPS = 64
SAVE_LOAD_ATOL = 1e-6
MERGE_ATOL = 1e-4
QUANTIZED_CHECKED = ("nf4", "fp4", "int8")
# Relative gradient error (norm of the difference over the norm of the float model's gradient)
# allowed per trainable tensor on a quantized base against the dequantized float model. The
# quantized runs compute in float32 (``QUANTIZED_COMPUTE``), where nf4/fp4 training dequantizes
# and multiplies exactly as the float model does; int8 training dequantizes row-scaled int8.
GRAD_RTOL = 1e-4
QUANTIZED_COMPUTE = ("quantization.bnb_4bit_compute_dtype=float32",)
HOOK_STEPS = 3  # optimizer steps of the training run check_training_hooks watches
HOOK_ACCUMULATE = 2  # batches per optimizer step there (the hooks run once per step, not per batch)
GRAD_SEED = 1234


@dataclass
class ContractRun:
    """A method applied to a freshly loaded tiny base, with one fixed batch."""

    name: str
    cfg: DictConfig
    method: BaseMethod
    model: nn.Module
    base_param_ids: set[int]
    batch: dict[str, torch.Tensor]
    labels: Sequence[str] | None = None
    initial_logits: torch.Tensor | None = None  # the model as ``apply`` left it (``train_until_moved``)

    def inputs(self) -> dict[str, Any]:
        """The model inputs without labels, for comparing logits (of a preference batch: its
        chosen sequences, the model's own input)."""
        if self.method.batch_kind == "preference":
            return {"input_ids": self.batch["chosen_input_ids"], "attention_mask": self.batch["chosen_attention_mask"]}
        if self.method.batch_kind == "prompt":
            return {"input_ids": self.batch["prompt_input_ids"], "attention_mask": self.batch["prompt_attention_mask"]}
        return {k: v for k, v in self.method.model_inputs(self.batch).items() if k != "labels"}


def contract_run(method: str, overrides: Sequence[str] = (), cache_dir: str | Path | None = None,
                 output_dir: str | Path | None = None) -> ContractRun:
    """Compose ``model=tiny method=<method>`` (plus ``overrides``), load the base, apply the method.

    The fixed batch is of the method's ``batch_kind``: for ``"preference"`` a batch of pairs from
    ``data=preference`` (unless ``overrides`` choose other pair data), encoded by the data module
    as a run encodes them (``connect(..., pairs=True)``)."""
    from ftlab.data.datamodule import FineTuneDataModule
    from ftlab.build import CONNECT_KWARGS, load_base

    kind = _accepted_class(method).batch_kind
    pairs = kind == "preference"
    settings = ["model=tiny", f"method={method}", "logger=none", "callbacks=none", "data.num_train=16",
                "data.num_val=8", "data.batch_size=4"]
    if pairs and not any(o.split("=", 1)[0].lstrip("+~") == "data" for o in overrides):
        settings.append("data=preference")
    if cache_dir is not None:
        settings.append(f"paths.cache_dir={cache_dir}")
    if output_dir is not None:
        settings.append(f"paths.output_dir={output_dir}")
    cfg = compose([*settings, *overrides])
    data = FineTuneDataModule(cfg.data)
    labels = data.labels if task_of(cfg) == "classification" else None
    applied, base, tokenizer = load_base(cfg, labels)
    base_ids = {id(p) for p in base.parameters()}
    model = applied.apply(base)
    data.connect(tokenizer, max_length=getattr(model.config, "max_position_embeddings", None),
                 **({**CONNECT_KWARGS[kind], "packing": False} if kind != "sft" else {}))
    data.setup("fit")
    if kind == "prompt":  # an RL method reads each prompt's example, as ftlab.build gives them
        applied.use_data(tokenizer, data.train_records, data.val_records)
    batch = next(iter(data.train_dataloader()))
    return ContractRun(method, cfg, applied, model, base_ids, dict(batch), labels)


def fresh_base(run: ContractRun) -> nn.Module:
    """The same base model again, loaded from scratch, as an export or a new process would."""
    from ftlab.build import load_base

    return load_base(run.cfg, run.labels)[1]


def _who(run: ContractRun) -> str:
    return f"method '{run.name}'"


def _accepted_class(method: str) -> type[BaseMethod]:
    from ftlab.registry import get_registry

    return get_registry().get(method).cls


def _accepted(method: str) -> tuple[str, ...]:
    return tuple(_accepted_class(method).quantizations)


# -- the checks -----------------------------------------------------------------------------------


def check_trainable(run: ContractRun) -> None:
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert trainable > 0, f"{_who(run)}: apply() left no parameter that requires grad"


def check_base_frozen(run: ContractRun) -> None:
    if run.method.trains_base:
        pytest.skip(f"{_who(run)} trains the base weights (trains_base=True): nothing must stay frozen")
    trained = [n for n, p in run.model.named_parameters() if p.requires_grad and id(p) in run.base_param_ids]
    assert not trained, f"{_who(run)}: base weights require grad but trains_base is False: {trained[:5]}"


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, to compare against after training (``changed_parameters``)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_parameters(model: nn.Module, before: Mapping[str, torch.Tensor]) -> set[str]:
    """Names of the parameters that differ, bit for bit, from a ``snapshot``."""
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _step(run: ContractRun, optimizer: torch.optim.Optimizer, global_step: int,
          trained: set[str] | None = None) -> torch.Tensor:
    """One optimizer step in a run's order (``ftlab.module``): ``on_train_step_start``, ``loss``,
    ``zero_grad``, backward, ``optimizer.step()``, ``on_step_end``. Both hooks get ``global_step``
    as Lightning's ``trainer.global_step`` is then: the steps completed before this one (0 first).
    ``trained`` collects the names of the parameters that require grad when the forward runs."""
    run.model.train()
    run.method.on_train_step_start(run.model, optimizer, global_step)
    if trained is not None:
        trained.update(n for n, p in run.model.named_parameters() if p.requires_grad)
    loss = run.method.loss(run.model, run.batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    run.method.on_step_end(run.model, global_step)
    return loss.detach()


def make_optimizer(run: ContractRun) -> torch.optim.Optimizer:
    """The optimizer the contract trains with: AdamW without weight decay (an untouched parameter
    stays bit-identical) over the method's ``parameter_groups`` at its own learning rate."""
    lr = float(run.method.config.lr)
    return torch.optim.AdamW(run.method.parameter_groups(run.model, lr), lr=lr, weight_decay=0.0)


def train_steps(run: ContractRun, steps: int, optimizer: torch.optim.Optimizer | None = None,
                first_step: int = 0) -> torch.optim.Optimizer:
    """Take ``steps`` optimizer steps on the run's fixed batch, numbered ``first_step``,
    ``first_step + 1``, ..., each through the method's hooks in a run's order (``on_train_step_start``,
    ``loss``, ``zero_grad``, backward, ``optimizer.step()``, ``on_step_end``); return the optimizer
    (``make_optimizer(run)`` unless given), to continue with or to inspect its state."""
    optimizer = optimizer if optimizer is not None else make_optimizer(run)
    for step in range(first_step, first_step + steps):
        loss = _step(run, optimizer, step)
        assert torch.isfinite(loss), f"{_who(run)}: training loss is {loss.item()} at step {step}"
    return optimizer


def check_steps_change_only_trainable(run: ContractRun, steps: int = CHANGE_STEPS) -> None:
    before = snapshot(run.model)
    trainable: set[str] = set()  # what requires grad at the forward of any step (the hooks may change it)
    optimizer = make_optimizer(run)
    for step in range(steps):
        loss = _step(run, optimizer, step, trainable)
        assert torch.isfinite(loss), f"{_who(run)}: training loss is {loss.item()} at step {step + 1}"
    changed = changed_parameters(run.model, before)
    frozen_changed = sorted(changed - trainable)
    assert not frozen_changed, f"{_who(run)}: frozen parameters changed in {steps} steps: {frozen_changed[:5]}"
    unchanged = sorted(trainable - changed)
    assert not unchanged, (
        f"{_who(run)}: {len(unchanged)} of {len(trainable)} trainable parameters did not change in {steps} steps "
        f"(no gradient reaches them, or the optimizer does not hold them): {unchanged[:5]}"
    )


@torch.no_grad()
def _eval_loss(run: ContractRun) -> float:
    run.model.eval()
    return float(run.method.loss(run.model, run.batch))


def _train_until(run: ContractRun, measure: Callable[[], float], enough: float, every: int,
                 limit: int) -> tuple[int, float]:
    """Train on the fixed batch ``every`` steps at a time until ``measure()`` reaches ``enough`` or
    ``limit`` steps have run; return the steps taken and the last measure."""
    optimizer = make_optimizer(run)
    step, value = 0, 0.0
    while step < limit and value < enough:
        for _ in range(every):
            _step(run, optimizer, step)
            step += 1
        value = measure()
    return step, value


def check_loss_falls(run: ContractRun) -> None:
    if run.method.batch_kind == "prompt":
        pytest.skip(f"{_who(run)} learns from rewards: its loss is a policy-gradient surrogate over normalized "
                    "advantages (about 0 at every step) whose value need not fall; its reward rising shows learning")
    first = _eval_loss(run)
    steps, drop = _train_until(run, lambda: (first - _eval_loss(run)) / abs(first), LOSS_MIN_DROP, LOSS_ROUND,
                               LOSS_MAX_STEPS)
    if drop < LOSS_MIN_DROP:
        pytest.fail(f"{_who(run)}: loss on a fixed batch fell by {100 * drop:.4f}% in {steps} steps, "
                    f"less than the {100 * LOSS_MIN_DROP:g}% required", pytrace=False)


@torch.no_grad()
def _logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()


def _train(run: ContractRun, steps: int = 2) -> None:
    """``steps`` optimizer steps on the fixed batch."""
    optimizer = make_optimizer(run)
    for step in range(steps):
        _step(run, optimizer, step)


def train_until_moved(run: ContractRun) -> torch.Tensor:
    """Train until the logits moved at least ``MIN_EFFECT`` from the model as applied, and return
    them: an equality check after save/load or merge means something only then (a method that
    dropped what trained would differ by about that much)."""
    if run.initial_logits is None:
        run.initial_logits = _logits(run.model, run.inputs())
    initial, last = run.initial_logits, run.initial_logits

    def effect() -> float:
        nonlocal last
        last = _logits(run.model, run.inputs())
        return (last - initial).abs().max().item()

    steps, moved = _train_until(run, effect, MIN_EFFECT, EFFECT_ROUND, EFFECT_MAX_STEPS)
    if moved < MIN_EFFECT:
        pytest.fail(f"{_who(run)}: {steps} training steps moved the logits by only {moved:.2e} (at least "
                    f"{MIN_EFFECT:g} is needed before save/load or merge can be compared)", pytrace=False)
    return last


def check_save_load(run: ContractRun, directory: str | Path) -> None:
    expected = train_until_moved(run)
    saved = run.method.save(run.model, Path(directory) / run.method.artifact)
    loaded = run.method.load(fresh_base(run), saved)
    got = _logits(loaded, run.inputs())
    assert got.shape == expected.shape, f"{_who(run)}: logits after load have shape {tuple(got.shape)}, not {tuple(expected.shape)}"
    diff = (got - expected).abs().max().item()
    assert diff <= SAVE_LOAD_ATOL, f"{_who(run)}: logits differ by {diff:.2e} after save+load (tolerance {SAVE_LOAD_ATOL})"


def check_merge(run: ContractRun, atol: float = MERGE_ATOL) -> None:
    from transformers import PreTrainedModel

    from ftlab.models.quant import dequantized, quantized_layers

    if run.method.cannot_merge:
        with pytest.raises(MethodError) as refused:
            run.method.merge(run.model)
        assert run.method.cannot_merge in str(refused.value), f"{_who(run)}: merge refused without saying why"
        return
    train_until_moved(run)
    with dequantized(run.model):  # a quantized base merges into its dequantized weights
        expected = _logits(run.model, run.inputs())
    merged = run.method.merge(run.model)
    assert isinstance(merged, PreTrainedModel), f"{_who(run)}: merge returned {type(merged).__name__}, not a transformers model"
    if merged is run.model:
        pytest.skip(f"{_who(run)}: merge returns the trained model itself (its weights are the base's): nothing is folded")
    leftovers = sorted({type(m).__name__ for m in merged.modules() if type(m).__module__.startswith("peft.")})
    assert not leftovers, f"{_who(run)}: merged model still holds PEFT modules {leftovers}"
    quantized = quantized_layers(merged)
    assert not quantized, f"{_who(run)}: merged model still holds {len(quantized)} bitsandbytes layers"
    diff = (_logits(merged, run.inputs()) - expected).abs().max().item()
    assert diff <= atol, f"{_who(run)}: merged logits differ by {diff:.2e} (tolerance {atol})"


# -- the hooks in a real training run ---------------------------------------------------------------


class _MemoryLogger(Logger):
    """A Lightning logger that keeps every metric it is given, for ``check_training_hooks``."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "contract"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def last(self, key: str) -> float | None:
        values = [m[key] for _, m in self.logged if key in m]
        return float(values[-1]) if values else None


class _FixedBatches(torch.utils.data.Dataset):
    """The run's fixed batch, ``count`` times (a DataLoader with ``batch_size=None`` yields it as is)."""

    def __init__(self, batch: Mapping[str, torch.Tensor], count: int) -> None:
        self.batch, self.count = dict(batch), count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


@dataclass
class HookCall:
    """One call of a step hook during ``check_training_hooks``."""

    hook: str  # "on_train_step_start" or "on_step_end"
    global_step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer | None  # on_train_step_start only
    unheld: list[str]  # parameters requiring grad after the hook that the optimizer does not hold


@dataclass
class PrepareCall:
    """One call of ``before_training`` during ``check_training_hooks``."""

    step_hooks_before: int  # step-hook calls that came before it (0: it ran before step 0)
    model: nn.Module
    batches: list[Mapping[str, torch.Tensor]]  # what its ``batches`` yielded


@contextlib.contextmanager
def _spied_hooks(method: BaseMethod, calls: list[HookCall],
                 prepared: list[PrepareCall] | None = None) -> Iterator[None]:
    """Record every call of the method's step hooks and of ``before_training`` (the method's own
    code still runs; ``before_training`` gets the batches as a list)."""
    start, end, prepare = method.on_train_step_start, method.on_step_end, method.before_training
    hooks = ("on_train_step_start", "on_step_end", "before_training")

    def on_train_step_start(model: nn.Module, optimizer: torch.optim.Optimizer, global_step: int) -> None:
        start(model, optimizer, global_step)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        unheld = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        calls.append(HookCall("on_train_step_start", global_step, model, optimizer, unheld))

    def on_step_end(model: nn.Module, global_step: int) -> None:
        end(model, global_step)
        calls.append(HookCall("on_step_end", global_step, model, None, []))

    def before_training(model: nn.Module, batches: Any) -> None:
        given = list(batches)
        if prepared is not None:
            prepared.append(PrepareCall(len(calls), model, given))
        prepare(model, given)

    shadowed = {k: vars(method)[k] for k in hooks if k in vars(method)}
    method.on_train_step_start, method.on_step_end = on_train_step_start, on_step_end  # type: ignore[method-assign]
    method.before_training = before_training  # type: ignore[method-assign]
    try:
        yield
    finally:
        for key in hooks:
            if key in shadowed:
                setattr(method, key, shadowed[key])
            else:
                delattr(method, key)


def check_training_hooks(run: ContractRun, directory: str | Path, steps: int = HOOK_STEPS,
                         accumulate: int = HOOK_ACCUMULATE) -> list[HookCall]:
    """Train ``steps`` optimizer steps of ``accumulate`` batches each through ftlab's training
    module and a Lightning Trainer, and check what the method's hooks see and log: returns the
    hook calls, in order."""
    import pytorch_lightning as pl

    from ftlab.module import FineTuneModule

    calls: list[HookCall] = []
    lr = float(run.method.config.lr)
    module = FineTuneModule(run.model, run.method,
                            optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=0.0))
    logger = _MemoryLogger()
    on_gpu = any(p.is_cuda for p in run.model.parameters())
    trainer = pl.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, max_steps=steps,
                         accumulate_grad_batches=accumulate, logger=logger, log_every_n_steps=1,
                         limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(directory))
    batches = torch.utils.data.DataLoader(_FixedBatches(run.batch, steps * accumulate), batch_size=None)
    prepared: list[PrepareCall] = []
    with _spied_hooks(run.method, calls, prepared), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*validation_step.* but have no `val_dataloader`")
        trainer.fit(module, train_dataloaders=batches)

    assert len(prepared) == 1, f"{_who(run)}: before_training was called {len(prepared)} times in one fit, not once"
    first = prepared[0]
    assert first.step_hooks_before == 0, f"{_who(run)}: before_training ran after {first.step_hooks_before} step hooks, not before step 0"
    assert first.model is run.model, f"{_who(run)}: before_training got another model than the one training"
    assert len(first.batches) == steps * accumulate and all(set(b) == set(run.batch) for b in first.batches), (
        f"{_who(run)}: before_training's batches were {len(first.batches)} batches, not the run's {steps * accumulate} "
        "training batches once each")

    expected = [(hook, k) for k in range(steps) for hook in ("on_train_step_start", "on_step_end")]
    got = [(c.hook, c.global_step) for c in calls]
    assert got == expected, (
        f"{_who(run)}: in {steps} optimizer steps of {accumulate} batches the step hooks were called as {got}, "
        f"not once each per step in the documented order {expected}"
    )
    optimizer = trainer.optimizers[0]
    for call in calls:
        assert call.model is run.model, f"{_who(run)}: {call.hook} got another model than the one training"
        if call.optimizer is not None:
            assert call.optimizer is optimizer, (
                f"{_who(run)}: on_train_step_start got {type(call.optimizer).__name__}, not the run's optimizer")
        assert not call.unheld, (
            f"{_who(run)}: after on_train_step_start at step {call.global_step}, parameters require grad that the "
            f"optimizer does not hold (return every parameter that may train from parameter_groups): {call.unheld[:5]}"
        )
    for name in run.method.metrics:
        assert name in module.method_metrics, (
            f"{_who(run)}: declares metric '{name}' (metrics = {tuple(run.method.metrics)}) but logged no value for it "
            f"during {steps} training steps: {name!r} would be missing from metrics.json's method_metrics"
        )
        shown = logger.last(f"method/{name}")
        assert shown is not None, f"{_who(run)}: metric '{name}' never reached the run's logger as 'method/{name}'"
    _check_validation_logged(run, module, directory)
    return calls


def _check_validation_logged(run: ContractRun, module: Any, directory: str | Path) -> None:
    """A Lightning validation through the training module logs every ``validation_metrics`` name
    as ``val/<name>`` with the epoch's mean (two copies of the fixed batch: the batch's value)."""
    import pytorch_lightning as pl

    expected = _validation_values(run)
    on_gpu = any(p.is_cuda for p in run.model.parameters())
    trainer = pl.Trainer(accelerator="gpu" if on_gpu else "cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(directory))
    batches = torch.utils.data.DataLoader(_FixedBatches(run.batch, 2), batch_size=None)
    (logged,) = trainer.validate(module, dataloaders=batches, verbose=False)
    for name, value in expected.items():
        key = f"val/{name}"
        assert key in logged, f"{_who(run)}: validation metric '{name}' was not logged as '{key}' (logged: {sorted(logged)})"
        assert abs(float(logged[key]) - value) <= 1e-4 * max(1.0, abs(value)), (
            f"{_who(run)}: '{key}' logged {float(logged[key]):.6g}, not the batch's {value:.6g}")
    assert list(expected) == [n for n in module.validation_names if n in expected], (
        f"{_who(run)}: the training module kept validation names {module.validation_names}, not {list(expected)}")


@torch.no_grad()
def _validation_values(run: ContractRun) -> dict[str, float]:
    run.model.eval()
    values = run.method.validation_metrics(run.model, run.batch)
    return {name: run.method.metric_value(name, value) for name, value in values.items()}


def check_validation_metrics(run: ContractRun) -> None:
    """``validation_metrics`` (eval mode, no gradients) gives one number per valid name, among them
    ``loss``, equal to ``loss(model, batch)`` in eval mode: what ``val/loss`` reports is the loss."""
    try:
        values = _validation_values(run)
    except MethodError as bad:
        pytest.fail(f"{_who(run)}: validation_metrics gave a value that is no metric: {bad}", pytrace=False)
    assert "loss" in values, f"{_who(run)}: validation_metrics returned {sorted(values)}, without 'loss'"
    loss = _eval_loss(run)
    assert abs(values["loss"] - loss) <= 1e-5 * max(1.0, abs(loss)), (
        f"{_who(run)}: validation_metrics' loss is {values['loss']:.6g}, but loss() in eval mode is {loss:.6g}")


def check_batch_kind_and_head(run: ContractRun) -> None:
    """The fixed batch is of the method's ``batch_kind`` (as the data module gives it in a run), and
    the model's output layer is its ``head``: the LM head (or a task=classification head), or one
    reward per sequence."""
    from ftlab.methods.base import BATCH_KINDS, HEADS

    method = run.method
    assert method.batch_kind in BATCH_KINDS, f"{_who(run)}: batch_kind {method.batch_kind!r} is none of {BATCH_KINDS}"
    assert method.head in HEADS, f"{_who(run)}: head {method.head!r} is none of {HEADS}"
    wanted = {"sft": {"input_ids", "attention_mask", "labels"},
              "preference": {f"{side}_{key}" for side in ("chosen", "rejected")
                             for key in ("input_ids", "attention_mask", "labels")} | {"index"},
              "prompt": {"prompt_input_ids", "prompt_attention_mask", "index", "split"}}[method.batch_kind]
    assert wanted <= set(run.batch), f"{_who(run)}: a {method.batch_kind} batch lacks {sorted(wanted - set(run.batch))}"
    if method.batch_kind == "prompt":  # the model's input is generated from the prompts: nothing fixed to run here
        return
    logits = _logits(run.model, run.inputs())
    if method.head == "reward":
        assert logits.dim() == 2 and logits.shape[-1] == 1, (
            f"{_who(run)}: a reward head gives one output per sequence, not logits of shape {tuple(logits.shape)}")
    elif run.labels is None:
        assert logits.dim() == 3, f"{_who(run)}: an LM head gives [batch, tokens, vocab] logits, not {tuple(logits.shape)}"


# -- quantized bases ------------------------------------------------------------------------------


def quantized_run(method: str, quant: str, overrides: Sequence[str] = (), cache_dir: str | Path | None = None,
                  output_dir: str | Path | None = None) -> ContractRun:
    """``contract_run`` on a ``quant`` base, or a skip naming the bases the method accepts."""
    accepted = _accepted(method)
    if quant not in accepted:
        pytest.skip(f"method '{method}' does not train a quantization={quant} base (it accepts: {', '.join(accepted)})")
    compute = QUANTIZED_COMPUTE if quant in ("nf4", "fp4") else ()
    try:
        run = contract_run(method, [*overrides, f"quantization={quant}", *compute], cache_dir=cache_dir,
                           output_dir=output_dir)
    except ConfigError as refused:  # the method's check_config refuses this combination, with its reason
        pytest.skip(f"method '{method}' refuses quantization={quant} here: {refused}")
    run.name = f"{method}' on quantization='{quant}"
    return run


def check_base_quantized(run: ContractRun, quant: str) -> None:
    """The base really is held in ``quant``: bitsandbytes layers of that kind, and no silent fallback."""
    import bitsandbytes as bnb

    from ftlab.models.quant import quantized_layers

    layers = [layer for _, _, layer in quantized_layers(run.model)]
    kind = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    held = [layer for layer in layers if isinstance(layer, kind)]
    assert held, f"{_who(run)}: the base holds no bitsandbytes {kind.__name__} layer: it was not quantized"
    if quant != "int8":
        types = sorted({layer.weight.quant_type for layer in held})
        assert types == [quant], f"{_who(run)}: 4-bit layers are {types}, not {quant}"


def check_quantized_base(run: ContractRun, quant: str, directory: str | Path) -> None:
    """On a quantized base: really quantized, base frozen, steps change only what trains, and
    save/load gives the same logits."""
    check_base_quantized(run, quant)
    check_trainable(run)
    trained = [n for n, p in run.model.named_parameters() if p.requires_grad and id(p) in run.base_param_ids]
    assert not trained, f"{_who(run)}: base weights require grad on a quantized base: {trained[:5]}"
    check_steps_change_only_trainable(run)
    check_save_load(run, directory)


def gradients(run: ContractRun) -> dict[str, torch.Tensor]:
    """The gradient of every trainable parameter on the fixed batch (train mode, dropout seeded)."""
    run.model.train()
    run.model.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(GRAD_SEED)
        run.method.loss(run.model, run.batch).backward()
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in run.model.named_parameters() if p.requires_grad}
    run.model.zero_grad(set_to_none=True)
    return grads


def gradient_errors(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Relative error per tensor: ||got - expected|| / ||expected|| (absolute where expected is 0)."""
    errors = {}
    for name, want in expected.items():
        scale = want.float().norm().item()
        errors[name] = (got[name].float() - want.float()).norm().item() / (scale if scale > 0 else 1.0)
    return errors


def check_quantized_gradients(run: ContractRun, rtol: float = GRAD_RTOL) -> dict[str, float]:
    """Gradients on the quantized base against the dequantized float model, before and after an
    eval-mode pass; returns the worst relative error of each (``fresh``, ``after_eval``)."""
    from ftlab.models.quant import dequantized, quantized_layers

    assert quantized_layers(run.model), f"{_who(run)}: no bitsandbytes layer to check gradients through"
    _train(run, CHANGE_STEPS)  # every trainable tensor has a gradient now (LoRA's B left zero)
    with dequantized(run.model):  # the float weights are read here, before any eval-mode pass
        expected = gradients(run)
    fresh = gradients(run)
    _logits(run.model, run.inputs())  # eval mode, no grad: what a base score or a validation does
    after_eval = gradients(run)
    worst = {}
    for label, got in (("fresh", fresh), ("after_eval", after_eval)):
        errors = gradient_errors(got, expected)
        name = max(errors, key=errors.get)
        worst[label] = errors[name]
        assert errors[name] <= rtol, (
            f"{_who(run)}: gradients {'after an eval-mode pass ' if label == 'after_eval' else ''}differ from the "
            f"dequantized float model's by {errors[name]:.2e} (relative, tolerance {rtol}) at {name}"
        )
    return worst


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: a tiny model's ops are fastest so, and more OpenMP threads
    spin-wait on a busy machine (a contract check took 38 s on two threads, 1 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- running a method class that is not installed ----------------------------------------------------


@contextlib.contextmanager
def registered(name: str, cls: type[BaseMethod]) -> Iterator[None]:
    """Register ``cls`` as method ``name`` for the duration (as its entry point would), so the
    contract can run on a class before it is packaged, or on a deliberately broken one."""
    from hydra.core.config_store import ConfigStore

    from ftlab.registry import METHOD_GROUP, MethodInfo, _config_node, _validate, get_registry

    registry = get_registry()
    if name in registry.methods or name in registry.presets:
        raise MethodError(f"method '{name}' is installed already")
    info = MethodInfo(name, _validate(name, cls), cls.__module__.split(".")[0], "", _config_node(name, cls))
    registry.methods[name] = info
    ConfigStore.instance().store(group=METHOD_GROUP, name=name, node=info.config_node, provider=info.package)
    try:
        yield
    finally:
        registry.methods.pop(name, None)


# -- the pytest base class ------------------------------------------------------------------------------


class MethodContract:
    """Subclass with ``method = "name"`` (and optional ``overrides``); pytest collects each check."""

    method: str = ""
    overrides: Sequence[str] = ()

    @pytest.fixture(scope="class")
    def contract_cache(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """The model cache: $FTLAB_CACHE when set, else one fresh folder per test class."""
        env = os.environ.get("FTLAB_CACHE")
        return Path(env) if env else tmp_path_factory.mktemp("ftlab-cache")

    @pytest.fixture(autouse=True)
    def _one_thread(self) -> Iterator[None]:
        with one_thread():
            yield

    @pytest.fixture
    def run(self, contract_cache: Path, tmp_path: Path) -> ContractRun:
        assert self.method, f"{type(self).__name__}.method must name the method under test"
        return contract_run(self.method, self.overrides, cache_dir=contract_cache, output_dir=tmp_path / "run")

    def _quantized(self, quant: str, contract_cache: Path, tmp_path: Path) -> ContractRun:
        return quantized_run(self.method, quant, self.overrides, cache_dir=contract_cache, output_dir=tmp_path / "run")

    def test_has_trainable_parameters(self, run: ContractRun) -> None:
        check_trainable(run)

    def test_base_weights_frozen(self, run: ContractRun) -> None:
        check_base_frozen(run)

    def test_steps_change_every_trainable_and_no_frozen_parameter(self, run: ContractRun) -> None:
        check_steps_change_only_trainable(run)

    def test_loss_falls_on_a_fixed_batch(self, run: ContractRun) -> None:
        check_loss_falls(run)

    def test_save_then_load_gives_same_logits(self, run: ContractRun, tmp_path: Path) -> None:
        check_save_load(run, tmp_path)

    def test_merge_gives_same_logits_or_says_why_not(self, run: ContractRun) -> None:
        check_merge(run)

    def test_step_hooks_and_metrics_in_a_training_run(self, run: ContractRun, tmp_path: Path) -> None:
        check_training_hooks(run, tmp_path / "hooks")

    def test_validation_metrics_hold_the_loss(self, run: ContractRun) -> None:
        check_validation_metrics(run)

    def test_batch_kind_and_head(self, run: ContractRun) -> None:
        check_batch_kind_and_head(run)

    @pytest.mark.parametrize("quant", QUANTIZED_CHECKED)
    def test_quantized_base_trains_saves_and_loads(self, quant: str, contract_cache: Path, tmp_path: Path) -> None:
        check_quantized_base(self._quantized(quant, contract_cache, tmp_path), quant, tmp_path)

    @pytest.mark.parametrize("quant", QUANTIZED_CHECKED)
    def test_quantized_merge(self, quant: str, contract_cache: Path, tmp_path: Path) -> None:
        check_merge(self._quantized(quant, contract_cache, tmp_path))

    @pytest.mark.parametrize("quant", QUANTIZED_CHECKED)
    def test_quantized_gradients_match_dequantized_float(self, quant: str, contract_cache: Path, tmp_path: Path) -> None:
        check_quantized_gradients(self._quantized(quant, contract_cache, tmp_path))



class SignalAt(Callback):
    """A Lightning callback that sends this process ``signal`` (a name: ``SIGKILL``, ``SIGTERM``,
    ``SIGINT``) once training has done ``step`` optimizer steps: an interruption at a known point,
    for tests of checkpoints and resumption. Add it to a run with
    ``+callbacks.stop._target_=ftlab.testing.SignalAt +callbacks.stop.step=6 +callbacks.stop.signal=SIGTERM``."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        import signal as signals

        self.step, self.signum = int(step), getattr(signals, signal)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == 0:  # as a scheduler signals the main process
            os.kill(os.getpid(), self.signum)
