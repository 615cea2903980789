"""task=classification: labelled topic data, a sequence-classification head, accuracy/precision/recall/F1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftlab.build import build
from ftlab.evaluation.classification import ClassificationMetrics, is_classifier
from ftlab.data import topics
from ftlab.data.sources import DataError, write_jsonl
from ftlab.errors import ConfigError
from ftlab.testing import changed_parameters, snapshot
from ftlab.train import fit, train

CLS = ("task=classification", "data.num_train=64", "data.num_val=32", "data.batch_size=8")


def test_topics_are_seeded_balanced_and_disjoint() -> None:
    train, val = topics.default_splits(80, 40, seed=0)
    assert (train, val) == topics.default_splits(80, 40, seed=0)
    assert train != topics.default_splits(80, 40, seed=1)[0]
    assert [r["label"] for r in train[:8]] == list(topics.LABELS) * 2
    assert not {r["text"] for r in train} & {r["text"] for r in val}
    assert len({r["text"] for r in train}) == 80


def test_metrics_match_hand_computed_values() -> None:
    metrics = ClassificationMetrics(["a", "b", "c"])
    logits = torch.eye(3)[[0, 1, 1, 2, 0]]  # predictions a b b c a
    metrics.update(logits[:2], torch.tensor([0, 1]))
    metrics.update(logits[2:], torch.tensor([2, 2, 0]))  # accumulated across batches
    out = metrics.compute()
    assert out["accuracy"] == pytest.approx(4 / 5)
    # per class: a P=2/2 R=2/2, b P=1/2 R=1/1, c P=1/1 R=1/2
    assert out["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert out["per_class"]["c"]["recall"] == pytest.approx(0.5) and out["per_class"]["c"]["support"] == 2
    assert out["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert out["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_linear_probe_trains_only_the_head_and_reports_metrics(tiny_cfg, tmp_path: Path) -> None:
    cfg = tiny_cfg(*CLS, "method=freeze", "method.last_n_blocks=0", "method.modules=[]", "method.lr=1e-2", steps=4)
    run = build(cfg)
    assert is_classifier(run.model) and run.model.config.num_labels == len(topics.LABELS)
    assert run.model.config.id2label == dict(enumerate(sorted(topics.LABELS)))
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == {"score.weight"}
    before = snapshot(run.model)
    result = fit(run, tmp_path)
    assert changed_parameters(run.model, before) == {"score.weight"}
    cls = result["classification"]
    assert set(cls) == {"accuracy", "precision", "recall", "f1", "per_class"}
    assert set(cls["per_class"]) == set(topics.LABELS)
    assert sum(v["support"] for v in cls["per_class"].values()) == 32  # every validation example counted once
    assert 0.0 <= result["accuracy"] <= 1.0 and result["f1"] == pytest.approx(cls["f1"], abs=1e-6)
    assert "exact_match" not in result  # no generation scoring on a classifier


@pytest.mark.parametrize("method", ["lora", "full", "ia3"])
def test_methods_train_the_head_and_save_it(tiny_cfg, tmp_path: Path, method: str) -> None:
    from ftlab.build import load_base

    run = build(tiny_cfg(*CLS, f"method={method}", steps=2))
    head = {n for n, p in run.model.named_parameters() if p.requires_grad and "score" in n}
    assert head, f"{method}: the new classification head does not train"
    before = snapshot(run.model)
    result = fit(run, tmp_path)
    assert head <= changed_parameters(run.model, before)
    batch = next(iter(run.datamodule.val_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    run.model.eval()
    with torch.no_grad():
        expected = run.model(**inputs).logits
        loaded = run.method.load(load_base(run.cfg, run.datamodule.labels)[1], Path(result["saved"])).eval()
        assert torch.allclose(loaded(**inputs).logits, expected, atol=1e-5)  # the trained head was saved


@pytest.mark.slow
def test_learned_classifier_beats_chance_and_reloads(tiny_cfg, tmp_path: Path) -> None:
    """A falsifiable end-to-end check: full fine-tuning of the tiny model learns the topics, and
    the saved model gives the same logits when loaded back with plain transformers."""
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_cfg("task=classification", "data.num_train=256", "data.num_val=64", "data.batch_size=16",
                   "data.eval_batch_size=64", "trainer.limit_val_batches=1", "method=full", "method.lr=3e-3",
                   steps=40)
    cfg.trainer.val_check_interval = 40
    record_dir = Path(cfg.paths.output_dir)
    train(cfg)
    record = json.loads((record_dir / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert record["accuracy"] > 0.6, record["classification"]  # chance is 0.25
    model = AutoModelForSequenceClassification.from_pretrained(record_dir / "model")
    assert model.config.id2label[0] == sorted(topics.LABELS)[0]


def test_unknown_validation_label_is_named(tiny_cfg, tmp_path: Path) -> None:
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_jsonl(train_file, [{"text": f"good {i}", "label": "pos"} for i in range(4)]
                + [{"text": f"bad {i}", "label": "neg"} for i in range(4)])
    write_jsonl(val_file, [{"text": "fine", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    cfg = tiny_cfg("task=classification", f"data.path={train_file}", f"data.val_path={val_file}")
    with pytest.raises(DataError, match=r"val.jsonl line 2: field 'label' is 'neutral', an unknown label \(known labels: neg, pos\)"):
        build(cfg).datamodule.setup()


def test_classification_needs_labelled_data(tiny_cfg) -> None:
    with pytest.raises(DataError, match="task=classification needs text/label rows"):
        build(tiny_cfg("task=classification", "data=synthetic"))


def test_adapter_refuses_classification(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match="method 'adapter' cannot train task=classification"):
        build(tiny_cfg("task=classification", "method=adapter"))


def _classification_methods() -> list[str]:
    from ftlab.registry import get_registry

    return sorted(name for name, info in get_registry().methods.items() if "classification" in info.cls.tasks)


@pytest.mark.slow
@pytest.mark.parametrize("method", _classification_methods())
def test_every_method_that_claims_classification_trains_its_head(tiny_cfg, tmp_path: Path, method: str) -> None:
    """The claim ``tasks`` makes is checked for every installed method, plugins included."""
    run = build(tiny_cfg(*CLS, f"method={method}", "trainer.limit_val_batches=1", steps=2))  # the first step has lr 0 (warm-up)
    head = {n for n, p in run.model.named_parameters() if p.requires_grad and "score" in n}
    assert head, f"{method}: the classification head does not train"
    before = snapshot(run.model)
    result = fit(run, tmp_path)
    assert head & changed_parameters(run.model, before), f"{method}: one step left the head unchanged"
    assert result["accuracy"] is not None
