"""Prompt batches for RL methods (``connect(..., prompts=True)``): left-padded prompts that end
where the answer starts, ``index`` and ``split`` leading back to each example, over-long prompts
dropped and counted, packing and non-chat data refused, a cache entry of their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ftlab.data.chat_masking import encode_prompt
from ftlab.data.datamodule import PROMPT_KEYS, PROMPT_SPLITS, FineTuneDataModule
from ftlab.data.encode import pad_id_of
from ftlab.data.sources import DataError, write_jsonl
from ftlab.models.loading import load_tokenizer
from ftlab.models.tiny import TINY_TOKENIZER_DIR


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER_DIR)


def _module(tok, cache_dir=None, **cfg) -> FineTuneDataModule:
    dm = FineTuneDataModule({"batch_size": 4, "eval_batch_size": 4, "seed": 0, "num_train": 16, "num_val": 8, **cfg})
    dm.connect(tok, cache_dir=cache_dir, prompts=True, packing=False)
    dm.setup()
    return dm


def test_prompt_batches_are_left_padded_prompts_that_lead_back_to_their_examples(tok) -> None:
    dm = _module(tok)
    pad = pad_id_of(tok)
    for loader, split in ((dm.train_dataloader(), 0), (dm.val_dataloader(), 1)):
        for batch in loader:
            assert tuple(batch) == PROMPT_KEYS and all(v.dtype == torch.long for v in batch.values())
            ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
            assert (mask[:, -1] == 1).all()  # every row ends where the answer starts
            assert (mask.diff(dim=1) >= 0).all()  # padding only on the left
            assert (ids[mask == 0] == pad).all()
            assert (batch["split"] == split).all()
            for row in range(ids.shape[0]):
                example = dm.prompt_record(int(batch["split"][row]), int(batch["index"][row]))
                assert example is (dm.train_records, dm.val_records)[split][int(batch["index"][row])]
                assert ids[row][mask[row] == 1].tolist() == encode_prompt(tok, example["messages"])
    text = tok.decode(next(iter(dm.val_dataloader()))["prompt_input_ids"][0], skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n") and dm.val_records[0]["messages"][-1]["content"] not in text
    assert PROMPT_SPLITS == ("train", "validation") and dm.prompt_record("validation", 2) is dm.val_records[2]
    assert dm.summary()["prompts"] is True


def test_a_prompt_longer_than_max_length_is_dropped_and_counted(tok) -> None:
    lengths = [len(encode_prompt(tok, r["messages"])) for r in _module(tok).train_records]
    limit = sorted(lengths)[len(lengths) // 2]
    dm = _module(tok, max_length=limit)
    kept = [len(ex["prompt_input_ids"]) for ex in dm.train_dataset.examples]
    assert kept and max(kept) <= limit and len(kept) == sum(n <= limit for n in lengths)
    report = dm.length_reports[0]
    assert report.dropped == {f"prompt longer than max_length={limit}": sum(n > limit for n in lengths)}
    with pytest.raises(DataError, match=r"every train prompt is longer than max_length=3 tokens; raise data.max_length"):
        _module(tok, max_length=3)


def test_prompts_need_packing_off_and_not_pairs_too(tok) -> None:
    dm = FineTuneDataModule({"num_train": 8, "num_val": 4, "packing": True})
    with pytest.raises(DataError, match=re.escape("data.packing=true cannot be used with prompt batches")):
        dm.connect(tok, prompts=True)
    dm.connect(tok, prompts=True, packing=False)  # what a run does for a method that cannot pack
    dm.setup()
    assert dm.packing_stats is None and "prompt_input_ids" in next(iter(dm.train_dataloader()))
    with pytest.raises(DataError, match=r"pairs=True and prompts=True are two kinds of batches"):
        FineTuneDataModule({"num_train": 8, "num_val": 4}).connect(tok, pairs=True, prompts=True)


def test_prompts_of_data_that_is_not_chat_say_what_the_data_is(tok, tmp_path: Path) -> None:
    topics = FineTuneDataModule({"synthetic": "topics", "format": "classification", "num_train": 8, "num_val": 4})
    with pytest.raises(DataError, match=r"^data 'synthetic': method 'grpo' generates answers to chat prompts .* but the "
                                        r"training data has classification examples \(keys: text, label;"):
        topics.check_prompts("grpo")  # before any tokenizer: a run refuses an RL method early
    with pytest.raises(DataError, match=r"the method generates answers to chat prompts"):
        topics.connect(tok, prompts=True, packing=False)
    chats = tmp_path / "c.jsonl"
    text = tmp_path / "t.jsonl"
    write_jsonl(chats, [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(8)])
    write_jsonl(text, [{"text": f"some text {i}"} for i in range(8)])
    mixed = FineTuneDataModule({"mix": [{"path": str(chats)}, {"path": str(text)}], "val_ratio": 0.25})
    with pytest.raises(DataError, match=r"training data has 6 of 12 examples that are not chats: text examples"):
        mixed.check_prompts()
    FineTuneDataModule({"synthetic": "preference", "num_train": 8, "num_val": 4}).check_prompts("grpo")


def test_preference_data_gives_the_prompts_of_its_pairs(tok) -> None:
    dm = _module(tok, synthetic="preference")
    batch = next(iter(dm.train_dataloader()))
    example = dm.prompt_record(0, int(batch["index"][0]))
    row = batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0] == 1].tolist()
    assert row == encode_prompt(tok, example["messages"])  # the chosen conversation without its answer


def test_prompt_encodings_have_their_own_cache_entry(tok, tmp_path: Path) -> None:
    plain = FineTuneDataModule({"num_train": 8, "num_val": 4})
    plain.connect(tok, cache_dir=tmp_path)
    plain.setup()
    first = _module(tok, cache_dir=tmp_path, num_train=8, num_val=4)
    assert first.cache_hits == {"train": False, "validation": False}  # not the supervised entry
    again = _module(tok, cache_dir=tmp_path, num_train=8, num_val=4)
    assert again.cache_hits == {"train": True, "validation": True}
    assert again.train_dataset.examples == first.train_dataset.examples
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "tokenized").iterdir() if p.is_dir())
    assert names == ["synthetic-train", "synthetic-train-prompts", "synthetic-validation", "synthetic-validation-prompts"]
