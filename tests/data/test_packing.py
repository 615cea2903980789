"""Packing: no attention across examples on the real forward path, the same loss as padding,
exact padding statistics, and gradients through packed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftlab.data.chat_masking import IGNORE_INDEX, encode_chat
from ftlab.data.datamodule import PadCollator, pad_id_of
from ftlab.data.packing import PackedCollator, PackingStats, pack, real_tokens
from ftlab.data.synthetic import default_splits
from ftlab.methods.base import BaseMethod, MethodConfig
from ftlab.models.loading import load_tokenizer
from ftlab.models.tiny import TINY_TOKENIZER_DIR
from ftlab.module import FineTuneModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.fixture
def model(checkpoint: Path):
    """Train mode as FineTuneModule sets it; the tiny config has no dropout, so it is deterministic."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).train()
    assert model.config.attention_dropout == 0.0
    assert model.config.use_cache  # the default that would disable packed-sequence masking
    return model


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict[str, list[int]]]:
    train, _ = default_splits(12, 0, 0)
    return [encode_chat(tokenizer, r["messages"], 256) for r in train]


def packed_batch(examples, tokenizer, max_length: int | None = None):
    """All examples packed into sequences of about two to three examples, collated as one batch."""
    longest = max(len(ex["input_ids"]) for ex in examples)
    seqs, _ = pack(examples, max_length or int(2.5 * longest), batch_size=len(examples))
    return seqs, PackedCollator(pad_id_of(tokenizer))(seqs)


def blocks(batch) -> list[tuple[int, int, int]]:
    """(row, start, end) of each example inside a packed batch, pad tails left out."""
    found = []
    for row, (pos, labels) in enumerate(zip(batch["position_ids"], batch["labels"])):
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for start, end in zip(starts, starts[1:]):
            if (labels[start:end] != IGNORE_INDEX).any():
                found.append((row, start, end))
    return found


def locate(examples, batch) -> list[tuple[int, int, int]]:
    """Where each example sits in the packed batch, found by its token ids."""
    spans = blocks(batch)
    where = []
    for ex in examples:
        ids = torch.tensor(ex["input_ids"])
        (span,) = [s for s in spans if torch.equal(batch["input_ids"][s[0], s[1] : s[2]], ids)]
        where.append(span)
    return where


def test_collator_output(examples, tokenizer):
    seqs, batch = packed_batch(examples, tokenizer)
    assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"}
    assert batch["use_cache"] is False
    width = batch["input_ids"].shape[1]
    row = min(range(len(seqs)), key=lambda i: len(seqs[i]["input_ids"]))
    n = len(seqs[row]["input_ids"])
    assert n < width, "the batch should have a padded row"
    assert batch["input_ids"][row, n:].tolist() == [pad_id_of(tokenizer)] * (width - n)
    assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
    assert batch["position_ids"][row, n:].tolist() == list(range(width - n))


def test_packed_logits_equal_each_example_alone(model, examples, tokenizer):
    seqs, batch = packed_batch(examples, tokenizer)
    assert len(seqs) < len(examples)
    assert real_tokens(batch) < batch["input_ids"].numel()  # a pad tail is part of the check
    method = BaseMethod(MethodConfig(name="full"))
    packed = model(**method.model_inputs(batch)).logits  # the call FineTuneModule makes
    for ex, (row, start, end) in zip(examples, locate(examples, batch)):
        alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
        torch.testing.assert_close(packed[row, start:end], alone, atol=1e-5, rtol=0)


def test_editing_one_example_leaves_its_neighbour_unchanged(model, examples, tokenizer):
    _, batch = packed_batch(examples, tokenizer)
    row, a_start, a_end = blocks(batch)[0]
    _, b_start, b_end = blocks(batch)[1]
    assert blocks(batch)[1][0] == row, "the first sequence should hold at least two examples"
    edited = dict(batch, input_ids=batch["input_ids"].clone())
    edited["input_ids"][row, a_end - 2] = (edited["input_ids"][row, a_end - 2] + 1) % len(tokenizer)

    def logits(b):
        with torch.no_grad():
            return model(**b).logits[row]

    before, after = logits(batch), logits(edited)
    assert not torch.equal(before[a_start:a_end], after[a_start:a_end])  # the edit does something
    assert torch.equal(before[b_start:b_end], after[b_start:b_end])
    # control: with the model's default use_cache the cache disables packed masking and B changes
    leaky = {k: v for k, v in batch.items() if k != "use_cache"}
    leaky_edited = {k: v for k, v in edited.items() if k != "use_cache"}
    assert not torch.equal(logits(leaky)[b_start:b_end], logits(leaky_edited)[b_start:b_end])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("labelled", ["assistant", "every token"])
def test_packed_loss_equals_padded_loss(model, examples, tokenizer, labelled):
    if labelled == "every token":  # first labels are real targets here, unlike chat's template start
        examples = [dict(ex, labels=list(ex["input_ids"])) for ex in examples]
    _, packed = packed_batch(examples, tokenizer)
    padded = PadCollator(pad_id_of(tokenizer))(examples)
    # the loss is a mean over targets (labels shifted by one): both batches have the same ones
    targets = lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum())  # noqa: E731
    assert targets(packed) == targets(padded)
    assert real_tokens(packed) == real_tokens(padded) == sum(len(ex["input_ids"]) for ex in examples)
    with torch.no_grad():
        loss_packed, loss_padded = model(**packed).loss, model(**padded).loss
    assert abs(loss_packed.item() - loss_padded.item()) < 1e-5
    module = FineTuneModule(model, BaseMethod(MethodConfig(name="full")), optimizer=torch.optim.SGD)
    with torch.no_grad():
        step_loss = module.training_step(packed, 0)
    assert abs(step_loss.item() - loss_padded.item()) < 1e-5


def test_backward_through_packed_batch(model, examples, tokenizer):
    _, batch = packed_batch(examples, tokenizer)
    model(**batch).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


def example(n: int, start: int = 10) -> dict[str, list[int]]:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": list(ids), "attention_mask": [1] * n}


def test_pack_first_fit_and_stats():
    lengths = [6, 3, 4, 2, 7, 5, 3]
    exs = [example(n, start=100 * i) for i, n in enumerate(lengths)]
    seqs, stats = pack(exs, max_length=10, batch_size=2)
    # first fit: the last example fills the gap left in the second sequence, not a new one
    assert [len(s["input_ids"]) for s in seqs] == [9, 9, 7, 5]
    assert seqs[1]["input_ids"] == exs[2]["input_ids"] + exs[3]["input_ids"] + exs[6]["input_ids"]
    assert seqs[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert seqs[0]["labels"] == [IGNORE_INDEX, *range(1, 6), IGNORE_INDEX, 101, 102]
    # unpacked batches [6,3] [4,2] [7,5] [3] pad 3+2+2+0; packed [9,9] [7,5] pad 0+2
    assert stats == PackingStats(
        examples=7, sequences=4, tokens=30, padded_tokens_unpacked=7, padded_tokens_packed=2
    )
    assert stats.padding_removed == pytest.approx(5 / 7)
    assert stats.as_dict()["padding_removed"] == pytest.approx(5 / 7)
    assert real_tokens(PackedCollator(0)(seqs)) == 30


def test_pack_refuses_bad_examples():
    with pytest.raises(ValueError, match="11 tokens.*max_length=10"):
        pack([example(4), example(11)], max_length=10, batch_size=2)
    unlabelled = example(4)
    unlabelled["labels"] = [7] + [IGNORE_INDEX] * 3
    with pytest.raises(ValueError, match="no labelled token"):
        pack([unlabelled], max_length=10, batch_size=2)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_model_keeps_examples_apart(checkpoint, examples, tokenizer):
    """PEFT's LoRA wrapper passes position_ids and use_cache through to the base model."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(checkpoint)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    _, batch = packed_batch(examples, tokenizer)
    with torch.no_grad():
        packed = model(**batch).logits
        for ex, (row, start, end) in zip(examples, locate(examples, batch)):
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[row, start:end], alone, atol=1e-5, rtol=0)
