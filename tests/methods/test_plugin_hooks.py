"""A worked third-party method whose trainable set changes during training, written from
docs/plugins.md alone: LISA-like layerwise training (Pan et al. 2024, "LISA: Layerwise Importance
Sampling"), where the embeddings, head and final norm always train and the decoder blocks take
turns, one at a time, every ``interval`` optimizer steps.

The method imports only ftlab's public plugin API (``ftlab.method``, ``ftlab.models.structure``,
``ftlab.testing``, ``ftlab.errors``, ``ftlab.config.compose``); it finds the blocks with
``decoder_blocks``, switches them in ``on_train_step_start``, which gets the optimizer, resets
the optimizer state of the block it freezes, refuses the trainer strategies that fix the trainable
set when they wrap the model, and logs which block trains. It runs through the whole contract;
the tests below check the switching itself, the refusal, and (ftlab's side, the only place this
file imports ftlab internals) that what it logs reaches metrics.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import nn

from ftlab.config import compose
from ftlab.errors import ConfigError, MethodError
from ftlab.method import BaseMethod, MethodConfig, reset_optimizer_state
from ftlab.models.structure import decoder_blocks, final_norm, input_embeddings, lm_head, module_name
from ftlab.testing import (
    MethodContract,
    changed_parameters,
    check_training_hooks,
    contract_run,
    registered,
    snapshot,
    train_steps,
)

WRAPS_ONCE = "it changes which parameters train during training; {} fixes that set when it wraps the model"


@dataclass
class LisaConfig(MethodConfig):
    lr: float = field(default=1e-3, metadata={"help": "learning rate (the optimizer's lr follows it)"})
    interval: int = field(default=2, metadata={"help": "optimizer steps between two switches of the training block"})


class Lisa(BaseMethod):
    """LISA-like: embeddings, head and final norm always train; the decoder blocks take turns."""

    Config = LisaConfig
    trains_base = True
    metrics = ("active_block",)
    refused_strategies = {"ddp": WRAPS_ONCE.format("DDP"), "fsdp": WRAPS_ONCE.format("FSDP"),
                          "deepspeed": WRAPS_ONCE.format("DeepSpeed")}

    def apply(self, model: nn.Module) -> nn.Module:
        if self.config.interval < 1:
            raise ConfigError(f"method.interval={self.config.interval} must be at least 1")
        model.requires_grad_(False)
        for part in (input_embeddings(model), lm_head(model), final_norm(model)):
            part.requires_grad_(True)
        self.blocks = decoder_blocks(model)
        self.active = 0
        self.blocks[self.active].requires_grad_(True)  # something trains when the optimizer is built
        return model

    def parameter_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        # every block, frozen ones included: the optimizer must hold what a later step unfreezes
        return [{"params": list(model.parameters())}]

    def on_train_step_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, global_step: int) -> None:
        if global_step % self.config.interval == 0:
            chosen = (global_step // self.config.interval) % len(self.blocks)
            if chosen != self.active:
                leaving = self.blocks[self.active]
                leaving.requires_grad_(False)
                reset_optimizer_state(optimizer, leaving.parameters())  # its moments would be stale when it returns
                self.blocks[chosen].requires_grad_(True)
                self.active = chosen
        self.log("active_block", self.active)


@pytest.fixture
def lisa() -> Iterator[None]:
    with registered("lisa", Lisa):
        yield


class TestLisaContract(MethodContract):
    method = "lisa"

    @pytest.fixture(autouse=True, scope="class")
    def _registered(self) -> Iterator[None]:
        with registered("lisa", Lisa):
            yield


def _blocks_of(model: nn.Module) -> dict[int, set[str]]:
    prefix = module_name(model, decoder_blocks(model))
    names: dict[int, set[str]] = {}
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            names.setdefault(int(name[len(prefix) + 1:].split(".")[0]), set()).add(name)
    return names


def test_the_training_block_switches_every_two_steps_and_the_frozen_one_loses_its_state(lisa, cache_dir: Path,
                                                                                      tmp_path: Path) -> None:
    run = contract_run("lisa", cache_dir=cache_dir, output_dir=tmp_path / "run")
    blocks = _blocks_of(run.model)
    assert sorted(blocks) == [0, 1]  # the tiny Llama's two blocks
    params = dict(run.model.named_parameters())
    always = {n for n in params if not any(n in b for b in blocks.values())}
    assert always == {"model.embed_tokens.weight", "model.norm.weight"}  # the head is tied to the embeddings

    def trained_over(steps: int, optimizer: torch.optim.Optimizer | None, first: int) -> tuple[set[str], Any]:
        before = snapshot(run.model)
        optimizer = train_steps(run, steps, optimizer, first_step=first)
        return changed_parameters(run.model, before), optimizer

    changed, optimizer = trained_over(2, None, 0)  # steps 0, 1: block 0
    assert changed == blocks[0] | always
    assert run.method.active == 0

    changed, optimizer = trained_over(2, optimizer, 2)  # steps 2, 3: block 1; block 0 frozen and unchanged
    assert changed == blocks[1] | always
    assert {n for n, p in params.items() if p.requires_grad} == blocks[1] | always
    assert not any(params[n] in optimizer.state for n in blocks[0]), "block 0's optimizer state was not reset"
    assert all(int(optimizer.state[params[n]]["step"]) == 2 for n in blocks[1])

    changed, optimizer = trained_over(1, optimizer, 4)  # step 4: block 0 again, its Adam state started afresh
    assert changed == blocks[0] | always
    assert all(int(optimizer.state[params[n]]["step"]) == 1 for n in blocks[0])
    assert all(int(optimizer.state[params[n]]["step"]) == 5 for n in always)


def test_in_a_training_run_the_hook_gets_the_run_optimizer_at_each_step(lisa, cache_dir: Path, tmp_path: Path) -> None:
    run = contract_run("lisa", cache_dir=cache_dir, output_dir=tmp_path / "run")
    calls = check_training_hooks(run, tmp_path / "hooks", steps=3, accumulate=2)
    starts = [c for c in calls if c.hook == "on_train_step_start"]
    assert [c.global_step for c in starts] == [0, 1, 2]
    assert len({id(c.optimizer) for c in starts}) == 1
    assert run.method.active == 1  # switched at step 2


@pytest.mark.parametrize(("overrides", "shown", "reason"), [
    (["trainer.strategy=ddp"], "ddp", WRAPS_ONCE.format("DDP")),
    (["trainer.strategy=ddp_spawn"], "ddp_spawn", WRAPS_ONCE.format("DDP")),
    (["trainer=ddp"], "ddp", WRAPS_ONCE.format("DDP")),
    (["trainer.strategy=fsdp_cpu_offload"], "fsdp_cpu_offload", WRAPS_ONCE.format("FSDP")),
    (["trainer.strategy=deepspeed_stage_2"], "deepspeed_stage_2", WRAPS_ONCE.format("DeepSpeed")),
    (["trainer.devices=2"], r"auto (ddp over 2 device(s) x 1 node(s))", WRAPS_ONCE.format("DDP")),
    (["trainer.strategy={_target_:pytorch_lightning.strategies.DDPStrategy}"], "ddp (DDPStrategy)",
     WRAPS_ONCE.format("DDP")),
], ids=["ddp", "ddp_spawn", "trainer=ddp", "fsdp-prefix", "deepspeed-prefix", "auto-on-2-devices", "target-node"])
def test_a_refused_strategy_is_one_config_error_line_before_any_model_loads(lisa, overrides: list[str], shown: str,
                                                                            reason: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as refused:
        contract_run("lisa", overrides, cache_dir=cache, output_dir=tmp_path / "run")  # composes, then would load
    assert str(refused.value) == f"method 'lisa' cannot train with trainer.strategy={shown}: {reason}"
    assert "\n" not in str(refused.value)
    assert not cache.exists() or not any(cache.iterdir()), "a model was loaded before the strategy was refused"


def test_strategies_not_refused_compose(lisa) -> None:
    for strategy in ("auto", "single_device", "dp"):  # "dp" is neither "ddp" nor one of its "ddp_" forms
        assert compose(["model=tiny", "method=lisa", f"trainer.strategy={strategy}"]).trainer.strategy == strategy


def test_a_method_with_nothing_trainable_when_the_optimizer_is_built_is_refused(cache_dir: Path,
                                                                               tmp_path: Path) -> None:
    class LateStarter(Lisa):
        """Freezes every block until its first step: the optimizer would start with nothing to train."""

        def apply(self, model: nn.Module) -> nn.Module:
            return super().apply(model).requires_grad_(False)

    with registered("late_starter", LateStarter):
        run = contract_run("late_starter", cache_dir=cache_dir, output_dir=tmp_path / "run")
        with pytest.raises(MethodError, match="method 'late_starter' left no trainable parameter"):
            check_training_hooks(run, tmp_path / "hooks")


def test_what_the_method_logs_reaches_the_logger_and_metrics_json(lisa, tiny_cfg, tmp_path: Path) -> None:
    """ftlab's side: the training script writes the last value of each method metric into the record."""
    import csv
    import json

    from ftlab.train import train

    cfg = tiny_cfg("method=lisa", "logger=csv", steps=4)
    train(cfg)
    out = Path(cfg.paths.output_dir)
    record = json.loads((out / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert record["method_metrics"] == {"active_block": 1.0}  # steps 0-1 trained block 0, steps 2-3 block 1
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    logged = [(int(r["step"]), float(r["method/active_block"])) for r in rows if r.get("method/active_block")]
    assert logged == [(0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0)]


def test_log_refuses_a_bad_name_or_value() -> None:
    method = Lisa(LisaConfig(name="lisa"))
    method.log("active_block", torch.tensor(1))  # outside a run: checked, then dropped
    with pytest.raises(MethodError, match=r"method 'lisa' logs a metric named 'a b'"):
        method.log("a b", 1.0)
    with pytest.raises(MethodError, match=r"logs 'x' as a tensor of shape \(2,\): a metric is one number"):
        method.log("x", torch.ones(2))
    with pytest.raises(MethodError, match=r"logs 'x' as str: a metric is a number"):
        method.log("x", "1")
