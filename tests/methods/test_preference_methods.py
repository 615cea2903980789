"""The preference methods (dpo, orpo, simpo, kto, reward; presets ipo, sft) on model=tiny: each
trains through the command line to a completed run with its metrics; DPO starts at ln 2; the
reference is the base (LoRA disabled) or a frozen copy (adapter=none); precomputed reference
log-probs change nothing; the reward model loads back by path; DPO learns its training pairs;
runs export. The method contract (ftlab.testing) covers them too, on pair batches
(tests/methods/test_contract.py, and the adapter=none variants below)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftlab.config import compose
from ftlab.errors import ConfigError, FtlabError
from ftlab.testing import MethodContract, contract_run, fresh_base, snapshot, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

SWEPT = ("sft", "dpo", "orpo", "simpo", "kto", "reward")
LM_METHODS = ("sft", "dpo", "orpo", "simpo", "kto")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_RUN = ["model=tiny", "data=preference", "data.num_train=32", "data.num_val=16", "data.batch_size=4",
            "eval.num_prompts=2", "eval.num_samples=0", "eval.max_new_tokens=4", "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false"]


def _ftlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftlab", *args], capture_output=True, text=True, timeout=900,
                          env=ONE_THREAD)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """One sweep over the methods on the preference data, as a user runs it (3 steps each)."""
    folder = tmp_path_factory.mktemp("sweep")
    out = _ftlab("-m", f"method={','.join(SWEPT)}", "trainer.max_steps=3", "logger=csv", "callbacks=none",
                 *TINY_RUN, f"hydra.sweep.dir={folder}", f"paths.cache_dir={cache_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    return folder


def _job(sweep: Path, method: str) -> Path:
    return sweep / f"{SWEPT.index(method)}_{method}"


def _record(sweep: Path, method: str) -> dict:
    return json.loads((_job(sweep, method) / "metrics.json").read_text())


# -- every method through a real run ------------------------------------------------------------------


@pytest.mark.parametrize("method", SWEPT)
def test_each_method_completes_with_its_metrics_in_metrics_json(sweep: Path, method: str) -> None:
    from ftlab.registry import get_registry

    record = _record(sweep, method)
    assert record["status"] == "completed", record.get("error")
    assert record["steps"] == 3
    declared = get_registry().get(method).cls.metrics
    assert set(declared) <= set(record["method_metrics"]), (declared, record["method_metrics"])
    assert set(declared) | {"loss"} <= set(record["val_metrics"]), record["val_metrics"]
    assert record["val_metrics"]["loss"] == pytest.approx(record["val_loss"])
    for name in declared:  # the key ones top-level too
        assert record[f"val_{name.replace('/', '_')}"] == record["val_metrics"][name]
    if method == "reward":
        assert 0 <= record["reward_accuracy"] <= 1 and isinstance(record["reward_margin"], float)
        assert record["preference"]["pairs"] == 16
        assert record.get("preference_accuracy") is None and record.get("exact_match") is None
        assert (_job(sweep, method) / "adapter" / "adapter_model.safetensors").is_file()
    else:
        assert 0 <= record["preference_accuracy"] <= 1 and 0 <= record["base_preference_accuracy"] <= 1
        assert record["preference"]["pairs"] == 16
        assert isinstance(record["exact_match"], float)  # the chosen answers are still checkable
    if method != "sft":
        assert 0 <= record["val_rewards_accuracy" if method != "reward" else "val_reward_accuracy"] <= 1


def test_the_base_preference_accuracy_is_shared_and_the_table_compares_it(sweep: Path) -> None:
    bases = {_record(sweep, m)["base_preference_accuracy"] for m in LM_METHODS}
    assert len(bases) == 1  # one base, measured once (cached) and reported by every causal-LM job
    table = (sweep / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run |"))
    assert "| base preference acc |" in header and "| preference acc |" in header and "| reward acc |" in header
    assert all(f"| method={m} | 1 | 0 |" in table for m in SWEPT)
    csv_header = (sweep / "results.csv").read_text().splitlines()[0].split(",")
    assert {"preference_accuracy", "base_preference_accuracy", "reward_accuracy", "reward_margin"} <= set(csv_header)


def test_a_pair_method_on_data_without_pairs_is_one_error_line(tmp_path: Path, cache_dir: Path) -> None:
    out = _ftlab("method=dpo", "model=tiny", "trainer.max_steps=1", f"hydra.run.dir={tmp_path}",
                 f"paths.cache_dir={cache_dir}")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ftlab: error:") and "'dpo'" in last and "data=preference" in last, last
    assert "Loading weights" not in out.stderr  # refused before the model loads


def test_the_refusal_comes_before_the_model_loads(tiny_cfg, monkeypatch) -> None:
    import ftlab.build

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(ftlab.build, "load_model", no_loading)
    with pytest.raises(FtlabError, match="needs preference pairs"):
        ftlab.build.build(tiny_cfg("method=kto"))


@pytest.mark.parametrize("overrides,message", [
    (["method=dpo", "method.loss=squared"], r"method.loss=squared: expected one of: sigmoid \| ipo \| hinge \| robust"),
    (["method=dpo", "method.beta=0"], r"method.beta=0"),
    (["method=ipo", "method.label_smoothing=0.1"], r"label_smoothing=0.1 is not used by loss_type=ipo"),
    (["method=dpo", "method.adapter=none", "quantization=nf4"], r"method.adapter=none trains every weight"),
    (["method=reward", "method.adapter=full"], r"method.adapter=full: expected one of: lora \| none"),
    (["method=simpo", "method.gamma_beta_ratio=-1"], r"method.gamma_beta_ratio=-1"),
    (["method=kto", "method.desirable_weight=0"], r"method.desirable_weight=0"),
])
def test_bad_settings_are_refused_when_the_config_is_composed(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(["model=tiny", *overrides])


# -- the loss and the reference ------------------------------------------------------------------------


def test_dpo_loss_at_step_zero_is_ln2(cache_dir: Path) -> None:
    """LoRA's B starts at zero, so the policy is its reference: every log-ratio is 0 and the loss
    -log sigmoid(0) = ln 2, whatever the pairs (the hand value, not the loss code's own)."""
    for overrides in ((), ("method.label_smoothing=0.2",), ("method.precompute_ref=true",)):
        run = contract_run("dpo", overrides, cache_dir=cache_dir)
        run.model.train()
        assert float(run.method.loss(run.model, run.batch)) == pytest.approx(math.log(2), abs=1e-6)


@torch.no_grad()
def _chosen_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits


def test_the_reference_is_the_base_with_the_adapters_disabled(cache_dir: Path) -> None:
    run = contract_run("dpo", ("method.lr=1e-2",), cache_dir=cache_dir)
    base_logits = _chosen_logits(fresh_base(run), run.batch)
    before = sum(p.numel() for p in run.model.parameters())
    train_steps(run, 3)  # the adapters moved: the policy is no longer the base
    assert not torch.allclose(_chosen_logits(run.model, run.batch), base_logits, atol=1e-3)
    run.model.train()
    with run.method.as_reference(run.model) as reference:
        assert reference is run.model and not torch.is_grad_enabled() and not reference.training
        got = reference(input_ids=run.batch["chosen_input_ids"], attention_mask=run.batch["chosen_attention_mask"]).logits
    assert torch.allclose(got, base_logits, atol=1e-6), (got - base_logits).abs().max()
    assert run.model.training  # back in train mode
    assert run.method.reference is None and sum(p.numel() for p in run.model.parameters()) == before  # no copy


def test_full_fine_tuning_keeps_a_frozen_reference_copy_out_of_the_optimizer(cache_dir: Path, tmp_path: Path) -> None:
    run = contract_run("dpo", ("method.adapter=none", "method.lr=1e-4"), cache_dir=cache_dir)
    reference = run.method.reference
    assert reference is not None and reference is not run.model and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    model_ids = {id(p) for p in run.model.parameters()}
    assert not model_ids & {id(p) for p in reference.parameters()}
    assert all(p.requires_grad for p in run.model.parameters())
    run.model.train()
    assert float(run.method.loss(run.model, run.batch)) == pytest.approx(math.log(2), abs=1e-6)
    frozen, trained = snapshot(reference), snapshot(run.model)
    optimizer = train_steps(run, 3)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not held & {id(p) for p in reference.parameters()}
    assert all(torch.equal(p, frozen[n]) for n, p in reference.named_parameters())
    assert all(not torch.equal(p, trained[n]) for n, p in run.model.named_parameters())
    saved = run.method.save(run.model, tmp_path / run.method.artifact)
    assert run.method.artifact == "model" and (saved / "model.safetensors").is_file()
    from safetensors.torch import load_file

    stored = load_file(str(saved / "model.safetensors"))  # the policy only, not the reference as well
    assert sum(t.numel() for t in stored.values()) == sum(p.numel() for p in run.model.parameters())
    loaded = run.method.load(fresh_base(run), saved)
    assert torch.allclose(_chosen_logits(loaded, run.batch), _chosen_logits(run.model, run.batch), atol=1e-6)


def test_kto_pairs_each_prompt_with_the_next_answer() -> None:
    from ftlab.methods.preference import mismatched_pairs

    ids = torch.tensor([[1, 2, 10, 11, 0], [3, 20, 21, 22, 0], [4, 5, 6, 30, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, 10, 11, -100], [-100, 20, 21, 22, -100], [-100, -100, -100, 30, -100]])
    new_ids, new_mask, new_labels = mismatched_pairs(ids, mask, labels)
    assert new_ids.tolist() == [[1, 2, 20, 21, 22], [3, 30, 0, 0, 0], [4, 5, 6, 10, 11]]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert new_labels.tolist() == [[-100, -100, 20, 21, 22], [-100, 30, -100, -100, -100], [-100, -100, -100, 10, 11]]


# -- training runs in process -------------------------------------------------------------------------


def _fitted(tiny_cfg, *overrides: str, steps: int = 4):
    from ftlab.build import build
    from ftlab.train import fit

    cfg = tiny_cfg("data=preference", "data.num_train=16", "data.num_val=8", "eval.generate=false", *overrides,
                   steps=steps)
    run = build(cfg)
    return run, fit(run, Path(cfg.paths.output_dir))


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_precomputed_reference_gives_the_same_losses(tiny_cfg, method: str) -> None:
    from ftlab.methods.preference import PreferenceMethod

    computed = []
    original = PreferenceMethod.reference_sums

    def counting(self, model, *args):
        computed.append(model.training)
        return original(self, model, *args)

    on_the_fly, _ = _fitted(tiny_cfg, f"method={method}", "method.lr=5e-3", "save_model=false")
    PreferenceMethod.reference_sums = counting  # type: ignore[method-assign]
    try:
        cached, _ = _fitted(tiny_cfg, f"method={method}", "method.lr=5e-3", "method.precompute_ref=true",
                            "save_model=false")
    finally:
        PreferenceMethod.reference_sums = original  # type: ignore[method-assign]
    assert len(cached.method._ref_cache) == 16  # every training pair, keyed by index
    assert cached.module.train_losses == pytest.approx(on_the_fly.module.train_losses, abs=1e-5)
    assert len(set(on_the_fly.module.train_losses)) > 1  # training moved: the comparison means something
    if method == "dpo":  # the reference ran for the 4 batches of before_training, never for a training step
        assert computed.count(True) == 4 and len(computed) > 4, computed  # (and for validation, in eval mode)


def test_a_few_dpo_steps_raise_the_preference_accuracy_on_the_training_pairs(tiny_cfg) -> None:
    from ftlab.build import build
    from ftlab.evaluation.preference import preference_accuracy
    from ftlab.train import fit

    cfg = tiny_cfg("method=dpo", "method.lr=5e-3", "data=preference", "data.num_train=16", "data.num_val=8",
                   "eval.generate=false", "save_model=false", "trainer.limit_val_batches=1", steps=40)
    run = build(cfg)
    pairs = run.datamodule.train_records
    before = preference_accuracy(run.model, run.tokenizer, pairs, 256)
    fit(run, Path(cfg.paths.output_dir))
    after = preference_accuracy(run.model, run.tokenizer, pairs, 256)
    assert before.pairs == after.pairs == 16
    assert after.accuracy >= 0.75 and after.accuracy >= before.accuracy + 0.25, (before, after)
    assert after.margin > before.margin


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_reward_model_saved_then_loaded_by_path_gives_the_same_scores(tiny_cfg, adapter: str) -> None:
    from ftlab.evaluation.preference import encode_pairs
    from ftlab.methods.reward import load_reward_model, reward_scores

    run, result = _fitted(tiny_cfg, "method=reward", f"method.adapter={adapter}", "method.lr=1e-3")
    saved = Path(result["saved"])
    assert saved.name == ("adapter" if adapter == "lora" else "model")
    pairs = encode_pairs(run.tokenizer, run.datamodule.val_records, 256)
    rows = [side for pair in pairs[:4] for side in pair]
    width = max(len(r["input_ids"]) for r in rows)
    pad = run.model.config.pad_token_id
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    with torch.no_grad():
        expected = reward_scores(run.model.eval(), ids, mask)
        loaded, tokenizer = load_reward_model(saved)
        got = reward_scores(loaded, ids, mask)
    assert tokenizer.pad_token_id == pad
    assert got.shape == (8,) and torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    assert result["reward_accuracy"] is not None and "preference_accuracy" not in result
    # as a reward function (what PPO's method.reward_model loads): text in, the same scores out
    from ftlab.methods.reward import RewardModel

    records = run.datamodule.val_records[:4]
    chosen = [r["messages"][-1]["content"] for r in records]
    scored = RewardModel(saved, batch_size=3).batch(["unused"] * 4, chosen, records)  # two batches, one short
    assert scored == pytest.approx(expected[0::2].tolist(), abs=1e-5)
    assert RewardModel(saved)("unused", chosen[1], records[1]) == pytest.approx(scored[1], abs=1e-5)


def test_validation_metrics_are_epoch_means_weighted_by_batch_size() -> None:
    import pytorch_lightning as pl

    from ftlab.methods.base import BaseMethod
    from ftlab.module import FineTuneModule

    class Shares(BaseMethod):
        def validation_metrics(self, model, batch):
            return {"loss": batch["v"].mean(), "share": batch["v"].mean()}

    method = Shares(OmegaConf.create({"name": "shares", "lr": 0.1}))
    module = FineTuneModule(torch.nn.Linear(1, 1), method, optimizer=None)  # type: ignore[arg-type]
    batches = [{"input_ids": torch.zeros(3, 2, dtype=torch.long), "v": torch.tensor([0.0, 0.0, 1.0])},
               {"input_ids": torch.zeros(1, 2, dtype=torch.long), "v": torch.tensor([1.0])}]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
    assert logged["val/share"] == pytest.approx(0.5)  # 2 of 4 examples, not the mean of 1/3 and 1
    assert module.validation_names == ["loss", "share"]


# -- export ------------------------------------------------------------------------------------------------


def test_a_dpo_run_exports_its_adapter(sweep: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftlab.deploy.export import export_run
    from ftlab.deploy.run_loading import open_run

    result = export_run(_job(sweep, "dpo"), tmp_path / "dpo")
    assert result.format == "peft-adapter"
    config = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                      tmp_path / "dpo").eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        expected = open_run(_job(sweep, "dpo")).load().model.eval()(input_ids=ids).logits
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)


def test_a_reward_run_exports_and_loads_back_by_path(sweep: Path, tmp_path: Path) -> None:
    from ftlab.deploy.export import export_run
    from ftlab.methods.reward import load_reward_model, reward_scores

    job = _job(sweep, "reward")
    adapter = export_run(job, tmp_path / "adapter")
    merged = export_run(job, tmp_path / "merged", merge=True)
    assert adapter.format == "peft-adapter" and merged.format == "transformers-model"
    ids = torch.tensor([[1, 5, 9, 42, 7, 3], [1, 8, 8, 2, 6, 3]])
    mask = torch.ones_like(ids)
    scores = {}
    with torch.no_grad():
        for name, path in (("run", job), ("artifact", job / "adapter"), ("export", tmp_path / "adapter"),
                           ("merged", tmp_path / "merged")):
            model, _ = load_reward_model(path)
            scores[name] = reward_scores(model, ids, mask)
    for name in ("artifact", "export"):
        assert torch.allclose(scores[name], scores["run"], atol=1e-6), name
    assert torch.allclose(scores["merged"], scores["run"], atol=1e-4)
    with pytest.raises(ConfigError, match="not a reward model"):
        load_reward_model(_job(sweep, "dpo"))


# -- the contract with full fine-tuning (the contract over every registered method runs adapter=lora) -----


class TestContractDpoFull(MethodContract):
    method = "dpo"
    overrides = ("method.adapter=none", "method.lr=1e-4")


class TestContractRewardFull(MethodContract):
    method = "reward"
    overrides = ("method.adapter=none", "method.lr=1e-4")


def test_a_full_dpo_run_exports_its_model_without_merge(tmp_path: Path, cache_dir: Path) -> None:
    """``method.adapter=none`` saves a whole model: export reads that from the run's method
    settings, not from the class (whose default is an adapter)."""
    from transformers import AutoModelForCausalLM

    from ftlab.deploy.export import export_run
    from ftlab.deploy.run_loading import open_run

    run = tmp_path / "run"
    out = _ftlab("method=dpo", "method.adapter=none", "trainer.max_steps=1", "logger=none", "callbacks=none",
                 *TINY_RUN, f"hydra.run.dir={run}", f"paths.cache_dir={cache_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    result = export_run(run, tmp_path / "export")
    assert result.format == "transformers-model"
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()(input_ids=ids).logits
        expected = open_run(run).load().model.eval()(input_ids=ids).logits
    assert torch.allclose(plain, expected, atol=1e-5)
