"""The data module end to end: sources and formats through preparation, mixing, limit, the
tokenized cache and packing, as a run uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftlab.build import build
from ftlab.data.schema import DataConfig
from ftlab.data.datamodule import FineTuneDataModule
from ftlab.data.sources import DataError, write_jsonl
from ftlab.models.loading import load_tokenizer
from ftlab.models.tiny import TINY_TOKENIZER_DIR
from ftlab.train import fit


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER_DIR)


def _module(tok, cache_dir=None, **cfg) -> FineTuneDataModule:
    dm = FineTuneDataModule({"batch_size": 4, "seed": 0, **cfg})
    dm.connect(tok, cache_dir=cache_dir)
    dm.setup()
    return dm


def _qa(path: Path, n: int, tag: str) -> Path:
    write_jsonl(path, [{"prompt": f"{tag} question {i}", "completion": f"{tag} answer {i}"} for i in range(n)])
    return path


def test_mix_by_weight_with_task_prefix(tok, tmp_path: Path) -> None:
    a, b = _qa(tmp_path / "a.jsonl", 40, "alpha"), _qa(tmp_path / "b.jsonl", 40, "beta")
    dm = _module(tok, mix=[{"path": str(a), "weight": 3, "prefix": "[A] "}, {"path": str(b), "weight": 1}], val_ratio=0.25)
    users = [r["messages"][0]["content"] for r in dm.train_records]
    n_a = sum(u.startswith("[A] alpha") for u in users)
    n_b = sum(u.startswith("beta") for u in users)
    assert (n_a, n_b) == (45, 15)  # 60 training rows in all, split 3:1
    assert dm.splits.mixed == {str(a): 45, str(b): 15}
    assert len(dm.val_records) == 20 and any(r["messages"][0]["content"].startswith("[A] ") for r in dm.val_records)


def test_limit_takes_a_fixed_seeded_subset(tok) -> None:
    full = _module(tok, num_train=64, num_val=8).train_records
    few = _module(tok, num_train=64, num_val=8, limit=10).train_records
    assert len(few) == 10 and all(r in full for r in few)
    assert few == _module(tok, num_train=64, num_val=8, limit=10).train_records
    other = FineTuneDataModule({"num_train": 64, "num_val": 8, "limit": 10, "seed": 1}).train_records
    assert [r["messages"] for r in other] != [r["messages"] for r in few]


def test_validation_rows_also_in_training_are_dropped_and_reported(tok, tmp_path: Path) -> None:
    train = _qa(tmp_path / "t.jsonl", 10, "x")
    val = tmp_path / "v.jsonl"
    write_jsonl(val, [{"prompt": "x question 3", "completion": "x answer 3"}, {"prompt": "new", "completion": "one"}])
    dm = _module(tok, path=str(train), val_path=str(val))
    assert [r["messages"][0]["content"] for r in dm.val_records] == ["new"]
    val_report = dm.splits.reports[1]
    assert val_report.dropped == {"also in the training data": 1}


def test_second_setup_reads_tokens_from_the_cache(tok, tmp_path: Path) -> None:
    first = _module(tok, cache_dir=tmp_path, num_train=32, num_val=8)
    assert first.cache_hits == {"train": False, "validation": False}
    second = _module(tok, cache_dir=tmp_path, num_train=32, num_val=8)
    assert second.cache_hits == {"train": True, "validation": True}
    assert second.train_dataset.examples == first.train_dataset.examples
    third = _module(tok, cache_dir=tmp_path, num_train=32, num_val=8, max_length=32)
    assert third.cache_hits["train"] is True  # truncation happens after the cache: same tokens
    changed = _module(tok, cache_dir=tmp_path, num_train=33, num_val=8)
    assert changed.cache_hits["train"] is False


def test_length_filter_counts_what_it_drops(tok) -> None:
    dm = _module(tok, num_train=40, num_val=0, max_tokens=45, min_tokens=30)
    report = dm.length_reports[0]
    lengths = sorted(len(ex["input_ids"]) for ex in dm.train_dataset.examples)
    assert 30 <= lengths[0] and lengths[-1] <= 45
    assert report.kept == len(lengths) and report.kept + sum(report.dropped.values()) == 40
    assert set(report.dropped) <= {"too short (< 30 tokens)", "too long (> 45 tokens)"} and report.dropped


def test_packing_removes_padding_and_trains(tiny_cfg, tmp_path: Path) -> None:
    run = build(tiny_cfg("data.packing=true", "method=lora", steps=2))
    run.datamodule.setup()
    stats = run.datamodule.packing_stats
    assert stats is not None and stats.sequences < stats.examples and stats.padding_removed > 0.3
    batch = next(iter(run.datamodule.train_dataloader()))
    assert "attention_mask" not in batch and batch["use_cache"] is False
    result = fit(run, tmp_path)
    assert result["data"]["packing"]["padding_removed"] == pytest.approx(stats.padding_removed)
    assert all(torch.isfinite(torch.tensor(result["train_losses"])))


def test_prompt_methods_train_unpacked(tiny_cfg, caplog) -> None:
    run = build(tiny_cfg("data.packing=true", "method=prompt"))
    assert "cannot take packed batches" in caplog.text
    run.datamodule.setup()
    assert run.datamodule.packing_stats is None
    assert "attention_mask" in next(iter(run.datamodule.train_dataloader()))


def test_run_record_reports_preparation(tiny_cfg, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("instruction,input,output\n" + "".join(f"Say {i},,{i}\n" for i in range(20)) + "Say 3,,3\nSay x,,\n")
    run = build(tiny_cfg(f"data.path={data}", "data.prepare.missing=drop", "data.val_ratio=0.2"))
    result = fit(run, tmp_path)
    prep = result["data"]["preparation"]
    dropped = {k: v for report in prep for k, v in report["dropped"].items()}
    assert dropped.get("duplicate", 0) + dropped.get("also in the training data", 0) == 1
    assert any("missing field 'output'" in k for k in dropped)
    assert result["data"]["kind"] == "chat"


def test_config_errors_name_the_field() -> None:
    with pytest.raises(DataError, match=r"unknown data config field\(s\) data.batchsize"):
        DataConfig.from_any({"batchsize": 4})
    with pytest.raises(DataError, match=r"data.mix\[0\].wieght"):
        DataConfig.from_any({"mix": [{"path": "a.jsonl", "wieght": 2}]})
    with pytest.raises(DataError, match=r"data.format='csv' is not valid: expected auto \| alpaca"):
        DataConfig.from_any({"format": "csv"})
    with pytest.raises(DataError, match="data.path and data.mix are both set"):
        DataConfig.from_any({"path": "a.jsonl", "mix": [{"path": "b.jsonl"}]})
    with pytest.raises(DataError, match=r"data.limit=0 is not valid"):
        DataConfig.from_any({"limit": 0})


def test_synthetic_writer_round_trips(tmp_path: Path) -> None:
    from ftlab.data import topics

    topics.main(["--out", str(tmp_path), "--num-train", "8", "--num-val", "4"])
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert rows == topics.default_splits(8, 4, 0)[0]
