"""Several processes train as one: DDP against one process, rank-0-only records, the sharded presets.

Lightning runs FSDP and DeepSpeed on CUDA GPUs only, so here their presets are composed,
instantiated and refused where they must be; DDP runs for real with two gloo processes on CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from ftlab.config import compose
from ftlab.data.distributed import RankShareSampler
from ftlab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
PRESETS = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def _batches(loader: DataLoader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("n,world,per_rank", [(64, 2, 4), (50, 2, 4), (37, 3, 5)])
def test_rank_shares_are_the_one_process_batches(n: int, world: int, per_rank: int) -> None:
    """Step k of W ranks with batch B trains on step k's examples of one process with batch W*B,
    for two epochs (the second permutation is the one process's second too)."""
    data = list(range(n))
    one = DataLoader(data, batch_size=world * per_rank, shuffle=True, generator=torch.Generator().manual_seed(3))
    expected = [b for _ in range(2) for b in _batches(one)]
    shares = []
    for rank in range(world):
        g = torch.Generator().manual_seed(3)
        loader = DataLoader(data, batch_size=per_rank, sampler=RankShareSampler(data, g, world, rank), generator=g)
        shares.append([b for _ in range(2) for b in _batches(loader)])
    steps = [sorted(sum((share[k] for share in shares), [])) for k in range(len(shares[0]))]
    whole = n // (world * per_rank)  # steps without the padding an uneven last step needs
    per_epoch = len(steps) // 2
    for epoch in range(2):
        for k in range(whole):
            assert steps[epoch * per_epoch + k] == sorted(expected[epoch * len(expected) // 2 + k])
    # control: Lightning's default replacement (DistributedSampler) draws another order
    default = [_batches(DataLoader(data, batch_size=per_rank, sampler=DistributedSampler(data, world, r, seed=3)))
               for r in range(world)]
    assert sorted(sum((share[0] for share in default), [])) != sorted(expected[0])


def _equal_length_data(path: Path, rows: int = 64) -> Path:
    """Answers of one token each, so every rank's batch holds as many labelled tokens as its
    examples: then the mean of the ranks' mean losses (what DDP's averaged gradient follows) is the
    one-process mean over all labelled tokens, and the two runs must agree to rounding."""
    lines = [json.dumps({"instruction": f"Repeat the digit {i % 10} ({i}).", "output": str(i % 10)}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(out: Path, cache: Path, data: Path, *extra: str) -> tuple[dict, str]:
    args = ["model=tiny", f"data.path={data}", "data.val_ratio=0.25", "trainer.accelerator=cpu", "method=full",
            "method.lr=0.003", "trainer.max_steps=6", "trainer.val_check_interval=6",
            "trainer.precision=32-true", "eval.num_prompts=8", "checkpoint.every_n_steps=null", "logger=none",
            "callbacks=none", f"hydra.run.dir={out}", f"paths.cache_dir={cache}", *extra]
    done = subprocess.run([sys.executable, "-m", "ftlab", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text()), done.stdout + done.stderr


@pytest.mark.slow
def test_ddp_two_processes_train_as_one(tmp_path: Path, cache_dir: Path) -> None:
    """trainer=ddp on 2 CPU processes (batch 4 each) gives one process's loss curve (batch 8)
    within 1e-5 relative (float sums in another order), and only rank 0 wrote the run's files."""
    data = _equal_length_data(tmp_path / "digits.jsonl")
    one, _ = _run(tmp_path / "one", cache_dir, data, "data.batch_size=8")
    two, printed = _run(tmp_path / "two", cache_dir, data, "trainer=ddp", "data.batch_size=4")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in printed
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["global_batch_size"] == two["global_batch_size"] == 8
    assert two["batch_size_per_rank"] == 4 and two["strategy"] == "DDPStrategy"
    assert one["train_tokens"] == two["train_tokens"]  # the same examples, counted over both ranks
    # it learns (6.94 -> 6.12 measured), so other batches would give other losses from step 1 on
    assert one["train_losses"][-1] < 0.95 * one["train_losses"][0]
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=1e-5)  # measured: within 2e-7
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["exact_match"] == one["exact_match"]
    memory = two["memory_per_rank"]["peak_rss_mb"]
    assert len(memory["ranks"]) == 2 and all(v > 0 for v in memory["ranks"])
    assert memory["max"] == max(memory["ranks"]) == two["peak_rss_mb"]
    assert memory["sum"] == pytest.approx(sum(memory["ranks"]), abs=0.2)
    # rank 1 trained (its own log) and wrote nothing: a write from it would raise (check_rank_zero)
    rank1 = (tmp_path / "two" / "train_ddp_process_1.log").read_text()
    assert "method full on tiny-llama" in rank1
    assert "run record" not in rank1 and "saved model" not in rank1
    assert (tmp_path / "two" / "model" / "model.safetensors").exists()
    assert not list((tmp_path / "two").glob(".*.partial"))


def test_records_are_refused_from_another_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_lightning.utilities import rank_zero_only

    from ftlab.results import write_metrics

    write_metrics(tmp_path, {"status": "running"})
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with pytest.raises(RuntimeError, match="rank 1 tried to write metrics.json"):
        write_metrics(tmp_path, {"status": "completed"})
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "running"


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_and_instantiate(preset: str) -> None:
    """Each preset composes, passes the schema, and its strategy node builds Lightning's class;
    FSDP's wrap policy is the loaded model's decoder-layer class, found from the model."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from ftlab.schema import check_config
    from ftlab.registry import get_registry
    from ftlab.strategies import build_strategy

    cfg = compose([f"trainer={preset}", "model=tiny"])
    check_config(cfg, get_registry().get("lora").cls.Config)
    assert cfg.trainer.num_nodes == 1
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=64))
    if preset.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    strategy = build_strategy(cfg.trainer, llama)
    if preset == "ddp":
        assert strategy == "ddp" and cfg.trainer.devices == 2
        return
    assert cfg.trainer.accelerator == "gpu"
    if preset == "fsdp":
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
        assert strategy.kwargs["use_orig_params"] is True
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64))
        cfg.trainer.strategy.activation_checkpointing_policy = "decoder_layers"
        other = build_strategy(cfg.trainer, gpt2)
        assert other.kwargs["auto_wrap_policy"]._module_classes == {GPT2Block}
        assert other._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {GPT2Block}
    else:
        assert strategy.zero_stage_3 == (preset == "deepspeed_zero3")


@pytest.mark.parametrize("overrides,message", [
    (["trainer=fsdp", "trainer.accelerator=cpu"], "trainer.strategy=fsdp (FSDPStrategy) needs CUDA GPUs, and "
                                                   "trainer.accelerator=cpu: Lightning runs FSDP on CUDA GPUs only"),
    (["trainer=deepspeed_zero2"], "needs CUDA GPUs, and this machine has no CUDA GPU: Lightning runs DeepSpeed"),
    (["trainer.strategy=fsdp_cpu_offload", "trainer.accelerator=cpu"], "trainer.strategy=fsdp_cpu_offload needs CUDA GPUs"),
])
def test_sharded_strategies_refused_without_gpus(overrides: list[str], message: str, monkeypatch) -> None:
    """Refused where the job runs (a sweep for SLURM composes and validates on a login node
    without GPUs: ``compose`` passes)."""
    from ftlab.strategies import check_can_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose(["model=tiny", *overrides])
    with pytest.raises(ConfigError, match="on CPUs, trainer=ddp") as info:
        check_can_run(cfg)
    assert message in str(info.value)


@pytest.mark.slow  # a subprocess: the command line as a user meets the refusal
def test_fsdp_on_cpu_fails_in_one_line_with_a_record(tmp_path: Path, cache_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    done = subprocess.run([sys.executable, "-m", "ftlab", "trainer=fsdp", "model=tiny", f"hydra.run.dir={tmp_path}",
                           f"paths.cache_dir={cache_dir}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("ftlab: error: trainer.strategy=fsdp (FSDPStrategy) needs CUDA GPUs")
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "failed" and "needs CUDA GPUs" in record["error"]


def _on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_deepspeed_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from ftlab.strategies import check_can_run

    _on_gpus(monkeypatch)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs DeepSpeed, an optional extra: pip install 'ftlab\[deepspeed\]'"):
        check_can_run(compose(["model=tiny", "trainer=deepspeed_zero3"]))


@pytest.mark.parametrize("overrides,refused", [
    (["trainer=fsdp", "quantization=nf4"], "needs quantization.bnb_4bit_quant_storage=float32 (model.dtype), not uint8"),
    (["trainer=fsdp", "quantization=nf4", "quantization.bnb_4bit_quant_storage=bfloat16"],
     "needs quantization.bnb_4bit_quant_storage=float32 (model.dtype), not bfloat16"),
    (["trainer=deepspeed_zero3", "quantization=fp4", "model.dtype=bfloat16"],
     "needs quantization.bnb_4bit_quant_storage=bfloat16 (model.dtype), not uint8"),
    (["trainer=fsdp", "quantization=int8"], "quantization=int8 with trainer.strategy=fsdp (FSDPStrategy)"),
    (["trainer=fsdp", "quantization=nf4", "quantization.bnb_4bit_quant_storage=bfloat16", "model.dtype=bfloat16"], None),
    (["trainer=deepspeed_zero2", "quantization=nf4"], None),  # ZeRO-2 keeps whole weights on every rank
    (["trainer=fsdp", "quantization=nf4", "trainer.strategy.sharding_strategy=NO_SHARD"], None),
])
def test_quantized_base_under_sharding(overrides: list[str], refused: str | None) -> None:
    """A 4-bit base packed as uint8 bytes (bitsandbytes' default) is refused under a strategy that
    shards weights; a float storage equal to the model's dtype is accepted (checked by ``validate``,
    what every command runs before a model loads: ``compose`` validates)."""
    overrides = ["model=tiny", "method=lora", *overrides]
    if refused is None:
        compose(overrides)
        return
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert refused in str(info.value)


def test_float_quant_storage_holds_the_same_4bit_weights(cache_dir: Path) -> None:
    """The storage FSDP needs changes how the packed bytes are held, not the numbers: logits of
    an nf4 base stored as bfloat16 equal those of the uint8-stored one."""
    from ftlab.build import load_base

    logits = []
    for storage in ("uint8", "bfloat16"):
        cfg = compose(["model=tiny", "method=qlora", f"quantization.bnb_4bit_quant_storage={storage}",
                       "model.dtype=bfloat16", "quantization.bnb_4bit_compute_dtype=bfloat16",
                       f"paths.cache_dir={cache_dir}"])
        _, model, _ = load_base(cfg)
        weight = next(p for n, p in model.named_parameters() if n.endswith("q_proj.weight"))
        assert weight.dtype == (torch.uint8 if storage == "uint8" else torch.bfloat16)
        with torch.no_grad():
            logits.append(model(input_ids=torch.arange(1, 17)[None]).logits.float())
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_save_from_gathered_weights(method: str, tiny_cfg, tmp_path: Path) -> None:
    """Under FSDP/ZeRO-3 each rank's tensors are shards; the method saves from the gathered state
    dict instead (as Lightning's FSDP full state dict names it, without the module's ``model.``)."""
    from safetensors.torch import load_file

    from ftlab.build import build
    from ftlab.strategies import _inner

    run = build(tiny_cfg(f"method={method}"))
    trained = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trained.values():
            p.add_(torch.randn_like(p))
    gathered = _inner({k: v.clone() for k, v in run.module.state_dict().items()}, "model.")
    with torch.no_grad():  # what a rank holds: not the whole weights
        for p in trained.values():
            p.zero_()
    saved = run.method.save(run.model, tmp_path / "gathered", state_dict=gathered)
    local = run.method.save(run.model, tmp_path / "local")
    weights = next(saved.glob("*.safetensors")).name
    from_gathered, from_local = load_file(str(saved / weights)), load_file(str(local / weights))
    assert from_gathered and all(v.abs().sum() > 0 for v in from_gathered.values())
    assert all(v.abs().sum() == 0 for v in from_local.values())  # control: the shards alone are not the model


def test_sharded_run_scores_the_saved_model(tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """With weights sharded, rank 0 scores the model rebuilt from the saved artifact: the same
    exact match and samples as scoring the model in memory, and save_model=false leaves no folder."""
    import ftlab.train as train_module
    from ftlab.build import build

    cfg = tiny_cfg("method=lora", "eval.num_prompts=8", "save_model=false")
    in_memory = train_module.fit(build(cfg), Path(cfg.paths.output_dir))
    monkeypatch.setattr(train_module, "shards_weights", lambda cfg: True)
    reloaded = []
    real = train_module._reloaded
    monkeypatch.setattr(train_module, "_reloaded", lambda run, saved: reloaded.append(saved) or real(run, saved))
    cfg2 = tiny_cfg("method=lora", "eval.num_prompts=8", "save_model=false")
    out = Path(cfg2.paths.output_dir)
    sharded = train_module.fit(build(cfg2), out)
    assert reloaded and sharded["exact_match"] == in_memory["exact_match"]
    assert sharded["generation"]["samples"] == in_memory["generation"]["samples"]
    assert "saved" not in sharded and not (out / ".gathered").exists()


def test_one_process_record_states_its_batch(tiny_cfg) -> None:
    from ftlab.train import train

    cfg = tiny_cfg("method=lora", "data.batch_size=4", "trainer.accumulate_grad_batches=2")
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert (record["world_size"], record["batch_size_per_rank"], record["global_batch_size"]) == (1, 4, 8)
    (measured,) = record["memory_per_rank"]["peak_rss_mb"]["ranks"]  # at the end of training
    assert 0 < measured <= record["peak_rss_mb"]  # the run's peak, measured to its end
    assert OmegaConf.select(cfg, "trainer.num_nodes") == 1 and record["num_nodes"] == 1


def test_slurm_time_limit_warning_stops_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a SLURM job submitit sends SIGUSR2 ahead of the time limit: it stops the run as SIGTERM
    does (before training: at once, as Interrupted); outside SLURM the signal is left alone."""
    import os
    import signal

    from ftlab.errors import Interrupted
    from ftlab.interrupts import SignalGuard, guarded_signals

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert signal.SIGUSR2 not in guarded_signals()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(Interrupted) as info, SignalGuard():
        os.kill(os.getpid(), signal.SIGUSR2)
    assert info.value.signum == signal.SIGUSR2


def test_a_method_that_cannot_save_gathered_weights_is_refused_before_training(monkeypatch) -> None:
    """A plugin whose save(model, directory) predates state_dict= would lose a sharded run's result
    after training: refused when the config is checked; the built-in methods all take it."""
    from ftlab.config import validate
    from ftlab.methods.base import BaseMethod
    from ftlab.methods.lora import Lora
    from ftlab.registry import get_registry

    _on_gpus(monkeypatch)
    cfg = compose(["model=tiny", "trainer=fsdp", "method=lora"])
    validate(cfg)  # the built-in save takes the gathered weights

    def old_save(self: BaseMethod, model, directory):
        return directory

    monkeypatch.setattr(Lora, "save", old_save)
    assert get_registry().get("lora").cls is Lora
    with pytest.raises(ConfigError, match=r"method 'lora' cannot save a run of trainer.strategy=fsdp \(FSDPStrategy\): "
                                          r"its save\(model, directory\) takes no state_dict="):
        validate(cfg)
    validate(compose(["model=tiny", "trainer=deepspeed_zero2", "method=lora"])) if _has_deepspeed() else None


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("rank0", [True, False])
def test_gathering_fsdp_weights_is_a_collective_on_every_rank(rank0: bool, monkeypatch) -> None:
    """Every rank takes part in FSDP's full state dict (a rank that skipped it would leave the
    others waiting forever); rank 0 gets the weights, named as ``model.state_dict()`` names them."""
    from types import SimpleNamespace

    from pytorch_lightning.strategies import FSDPStrategy

    from ftlab.strategies import gathered_state_dict

    strategy, calls = FSDPStrategy(), []
    full = {"model.base_model.layer.weight": torch.ones(2), "metrics.total": torch.zeros(1)}
    monkeypatch.setattr(strategy, "lightning_module_state_dict", lambda: calls.append(1) or full)
    got = gathered_state_dict(SimpleNamespace(strategy=strategy, is_global_zero=rank0), torch.nn.Linear(2, 2))
    assert calls == [1]
    assert got == ({"base_model.layer.weight": full["model.base_model.layer.weight"]} if rank0 else {})


def test_zero3_weights_are_gathered_inside_deepspeeds_context(monkeypatch) -> None:
    from types import SimpleNamespace

    deepspeed = pytest.importorskip("deepspeed")
    from pytorch_lightning.strategies import DeepSpeedStrategy

    from ftlab.strategies import gathered_state_dict

    entered = []

    class Gathered:  # stands in for deepspeed.zero.GatheredParameters (a collective on real ZeRO-3 weights)
        def __init__(self, params, modifier_rank=None):
            entered.append((len(params), modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", Gathered)
    model = torch.nn.Linear(2, 2)
    for rank0 in (True, False):
        got = gathered_state_dict(SimpleNamespace(strategy=DeepSpeedStrategy(stage=3), is_global_zero=rank0), model)
        assert (set(got) == {"weight", "bias"}) if rank0 else got == {}
    assert entered == [(2, None), (2, None)]  # every rank enters, none writes back
    assert gathered_state_dict(SimpleNamespace(strategy=DeepSpeedStrategy(stage=2), is_global_zero=True), model) is None
