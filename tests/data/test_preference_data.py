"""Preference data: prompt/chosen/rejected rows and ranked lists, the built-in ``data=preference``
pairs, and the pair batches of ``connect(..., pairs=True)``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ftlab.config import compose
from ftlab.data.chat_masking import IGNORE_INDEX
from ftlab.data.datamodule import PAIR_KEYS, FineTuneDataModule
from ftlab.data.encode import pad_id_of
from ftlab.data.formats import detect_format, to_example, to_examples
from ftlab.data.prepare import PrepareConfig, PrepReport, prepare
from ftlab.data.sources import DataError, Row, read_rows, write_jsonl
from ftlab.data.synthetic import TASKS, WRONG_ANSWERS, default_splits, exact_match, preference_splits
from ftlab.models.loading import load_tokenizer
from ftlab.models.tiny import TINY_TOKENIZER_DIR

W = "train.jsonl line 7"
NEEDS = "format preference needs prompt, chosen, rejected; or prompt, responses (answers ranked best first)"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER_DIR)


def _raises(message: str):
    return pytest.raises(DataError, match="^" + re.escape(message) + "$")


def _chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def _module(tok, cache_dir=None, pairs=True, **cfg) -> FineTuneDataModule:
    dm = FineTuneDataModule({"batch_size": 4, "eval_batch_size": 4, "seed": 0, **cfg})
    dm.connect(tok, cache_dir=cache_dir, pairs=pairs)
    dm.setup()
    return dm


def _consistent(report: PrepReport) -> bool:
    return report.rows - sum(report.dropped.values()) + report.expanded + report.augmented == report.kept


def _decoded_labels(tok, labels: torch.Tensor) -> str:
    return tok.decode(labels[labels != IGNORE_INDEX].tolist())


# ---------------------------------------------------------------- row errors: file, line, field


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"chosen": "a", "rejected": "b"}, f"missing field 'prompt' ({NEEDS})"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, f"field 'prompt' is empty ({NEEDS})"),
        ({"prompt": _chat(("system", "s"), ("user", " ")), "chosen": "a", "rejected": "b"},
         "field 'prompt' is empty: no user message with text (expected the question both answers reply to)"),
        ({"prompt": "q", "rejected": "b"}, f"missing field 'chosen' ({NEEDS})"),
        ({"prompt": "q", "chosen": "a", "rejected": None}, f"missing field 'rejected' ({NEEDS})"),
        ({"prompt": "q", "chosen": "a", "rejected": ""}, f"field 'rejected' is empty ({NEEDS})"),
        ({"prompt": "q", "chosen": "a", "rejected": []}, f"field 'rejected' is empty ({NEEDS})"),
        ({"prompt": "q", "chosen": _chat(("assistant", " ")), "rejected": "b"},
         "field 'chosen[0].content' is empty (expected the chosen answer)"),
        ({"prompt": "q", "chosen": "a", "rejected": _chat(("user", "q"), ("assistant", ""))},
         "field 'rejected[1].content' is empty (expected the rejected answer)"),
        ({"prompt": "q", "chosen": "Paris", "rejected": "Paris"},
         "fields 'chosen' and 'rejected' are the same answer ('Paris'); a preference pair needs two different"
         " answers (remove the row or fix one side)"),
        # equal once rendered: a string answer and the same answer as a message list
        ({"prompt": "q", "chosen": "Paris", "rejected": _chat(("user", "q"), ("assistant", "Paris"))},
         "fields 'chosen' and 'rejected' are the same answer ('Paris'); a preference pair needs two different"
         " answers (remove the row or fix one side)"),
        ({"prompt": "q", "chosen": _chat(("assistant", "a"), ("user", "more?"), ("assistant", "b")),
          "rejected": _chat(("assistant", "a"))},
         "field 'rejected' has no answer of its own: its conversation is the start of the other side's"
         " (a preference pair needs an assistant answer on each side after the shared prompt)"),
    ],
)
def test_bad_preference_row_names_line_and_field(record: dict, message: str) -> None:
    with _raises(f"{W}: {message}"):
        to_examples(Row(W, record), "preference")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "q", "responses": "a"},
         "field 'responses' must be a list of answers ranked best first (strings or message lists), got string"),
        ({"prompt": "q", "responses": ["a"]}, "field 'responses' has 1 answer (a ranked list needs at least two, best first)"),
        ({"prompt": "q", "responses": ["a", "b", "a"]},
         "fields 'responses[0]' and 'responses[2]' are the same answer ('a'); a preference pair needs two different"
         " answers (remove the row or fix one side)"),
        ({"prompt": "q", "responses": ["a", " ", "c"]}, "field 'responses[1]' is empty (expected an answer)"),
        ({"prompt": "q", "responses": ["a", 3]},
         "field 'responses[1]' must be a string or a list of {role, content}, got number"),
        ({"prompt": "", "responses": ["a", "b"]}, f"field 'prompt' is empty ({NEEDS})"),
        ({"prompt": "q", "responses": ["a", "b"], "chosen": "a", "rejected": "b"},
         "fields 'responses' and 'chosen' are both set (format preference reads either prompt/chosen/rejected or"
         " prompt/responses)"),
    ],
)
def test_bad_ranked_row_names_line_and_field(record: dict, message: str) -> None:
    with _raises(f"{W}: {message}"):
        to_examples(Row(W, record), "preference")


def test_errors_from_a_file_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}
    write_jsonl(path, [good, good | {"prompt": "Capital of Spain?"}, {"prompt": "x", "chosen": "Same  answer",
                                                                        "rejected": "Same answer"}])
    # equal after whitespace normalization, which preparation applies first
    with _raises(f"{path} line 3: fields 'chosen' and 'rejected' are the same answer ('Same answer');"
                 " a preference pair needs two different answers (remove the row or fix one side)"):
        FineTuneDataModule({"path": str(path), "val_ratio": 0.0}).train_records
    write_jsonl(path, [good, {"prompt": "Capital of Italy?", "chosen": "Rome", "rejected": "  "}])
    with _raises(f"{path} line 2: field 'rejected' is empty ({NEEDS})"):
        FineTuneDataModule({"path": str(path), "val_ratio": 0.0}).train_records


# ---------------------------------------------------------------- ranked lists


def test_ranked_list_becomes_every_better_worse_pair_in_order() -> None:
    row = Row(W, {"prompt": "Rank these", "responses": ["a", "b", "c", "d"], "id": 9})
    examples = to_examples(row, "preference")
    pairs = [(e["messages"][-1]["content"], e["rejected"][-1]["content"]) for e in examples]
    assert pairs == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert all(e["messages"][0] == {"role": "user", "content": "Rank these"} and e["id"] == 9 for e in examples)
    assert [e["_where"] for e in examples][:2] == [f"{W} (responses[0] over responses[1])", f"{W} (responses[0] over responses[2])"]
    with _raises(f"{W}: field 'responses' gives 6 preference pairs, not one example"):
        to_example(row, "preference")
    assert detect_format([row], "s") == "preference"


def test_ranked_message_lists_answer_the_prompt() -> None:
    row = Row(W, {"prompt": _chat(("system", "s"), ("user", "q")),
                  "responses": [_chat(("assistant", "best")), "good", _chat(("user", "q"), ("assistant", "bad"))]})
    a, b, c = to_examples(row, "preference")
    assert a["messages"] == _chat(("system", "s"), ("user", "q"), ("assistant", "best"))
    assert a["rejected"] == _chat(("system", "s"), ("user", "q"), ("assistant", "good"))
    assert c["rejected"] == _chat(("user", "q"), ("assistant", "bad"))  # a whole conversation stays whole


def test_ranked_expansion_is_counted_in_the_preparation_report() -> None:
    rows = [
        Row("r.jsonl line 1", {"prompt": "p1", "responses": ["a", "b", "c"]}),  # 3 pairs
        Row("r.jsonl line 2", {"prompt": "p2", "chosen": "x", "rejected": "y"}),  # 1
        Row("r.jsonl line 3", {"prompt": "p3", "responses": ["a", "b", "c", "d"]}),  # 6
        Row("r.jsonl line 4", {"prompt": "p1", "responses": ["a", "b"]}),  # a duplicate of the first pair
    ]
    examples, report = prepare(rows, "preference", PrepareConfig(), source="r.jsonl", seed=0, train=True)
    assert len(examples) == 3 + 1 + 6
    assert (report.rows, report.ranked_rows, report.expanded, report.kept) == (4, 3, 2 + 5 + 0, 10)
    assert report.dropped == {"duplicate": 1} and _consistent(report)
    assert "r.jsonl: 3 ranked rows gave 10 preference pairs" in report.lines()
    assert report.as_dict()["expanded"] == 7


def test_ranked_rows_through_the_data_module(tok, tmp_path: Path) -> None:
    path = tmp_path / "ranked.jsonl"
    write_jsonl(path, [{"prompt": f"question {i}", "responses": [f"best {i}", f"middle {i}", f"worst {i}"]}
                       for i in range(10)])
    dm = _module(tok, path=str(path), val_ratio=0.2)  # format detected from the keys
    train_report, val_report = dm.splits.reports
    assert (train_report.rows, train_report.kept, train_report.expanded) == (8, 24, 16)
    assert (val_report.rows, val_report.kept) == (2, 6)
    assert len(dm.train_records) == 24 and len(dm.val_records) == 6
    # rows are split before they are expanded: a prompt's pairs all stay on one side
    prompts = lambda records: {r["messages"][0]["content"] for r in records}  # noqa: E731
    assert len(prompts(dm.val_records)) == 2 and not prompts(dm.val_records) & prompts(dm.train_records)
    assert dm.summary()["preparation"][0]["expanded"] == 16
    assert len(dm.train_dataset) == 24 and len(dm.val_dataset) == 6


# ---------------------------------------------------------------- built-in data=preference


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(", ")]


def _plausible(task: str, prompt: str, answer: str, wrong: str) -> bool:
    """The wrong answer is the kind of mistake the task invites, in the task's answer format."""
    if task in ("add", "subtract", "count_words", "extract_number"):
        return wrong.isdigit() and abs(int(wrong) - int(answer)) in (1, 10)
    if task == "extract_year":
        return re.fullmatch(r"\d{4}", wrong) is not None and abs(int(wrong) - int(answer)) in (1, 10)
    if task == "uppercase":
        return wrong.upper() == answer  # the same words, the wrong case
    if task == "reverse_words":
        return sorted(wrong.split(" ")) == sorted(answer.split(" "))
    if task == "extract_email":
        return re.fullmatch(r"[a-z]+(\.[a-z]+)?@[a-z]+\.[a-z]+", wrong) is not None
    if task == "sort_numbers":
        return sorted(_numbers(wrong)) == _numbers(answer)
    if task == "to_json":
        try:
            data = json.loads(wrong)
        except json.JSONDecodeError:  # malformed: Python's quotes around the same values
            return wrong == answer.replace('"', "'")
        return set(data) == {"name", "age"} and data["name"] == json.loads(answer)["name"]
    return False


def test_every_task_has_a_wrong_answer() -> None:
    assert set(WRONG_ANSWERS) == set(TASKS)


def test_synthetic_rejected_answers_are_wrong_and_plausible() -> None:
    train, val = preference_splits(600, 200, seed=3)
    assert len(train) == 600 and len(val) == 200
    for r in train + val:
        assert r["chosen"] == r["answer"] and set(r) == {"prompt", "chosen", "rejected", "task", "answer"}
        assert not exact_match(r["rejected"], r["answer"]), r
        assert _plausible(r["task"], r["prompt"], r["answer"], r["rejected"]), r
    # the mistakes vary: wrong values and malformed JSON, several wrong cases and orders
    jsons = [r["rejected"] for r in train if r["task"] == "to_json"]
    assert any(j.startswith("{'") for j in jsons) and any(j.startswith('{"') for j in jsons)
    cases = {("lower" if r["rejected"].islower() else "mixed") for r in train if r["task"] == "uppercase"}
    assert cases == {"lower", "mixed"}
    orders = [r for r in train if r["task"] == "sort_numbers"]
    assert any(_numbers(r["rejected"]) == sorted(_numbers(r["answer"]), reverse=True) for r in orders)
    assert any(_numbers(r["rejected"]) != sorted(_numbers(r["answer"]), reverse=True) for r in orders)


def test_synthetic_pairs_are_seeded_and_split_like_the_instruction_data() -> None:
    train, val = preference_splits(60, 20, seed=0)
    assert (train, val) == preference_splits(60, 20, seed=0)
    assert [r["rejected"] for r in train] != [r["rejected"] for r in preference_splits(60, 20, seed=1)[0]]
    plain_train, plain_val = default_splits(60, 20, 0)
    assert [r["prompt"] for r in train] == [r["messages"][0]["content"] for r in plain_train]
    assert [r["prompt"] for r in val] == [r["messages"][0]["content"] for r in plain_val]
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}


def test_data_preference_config_gives_pairs_with_answers(tok) -> None:
    cfg = compose(["data=preference", "data.num_train=30", "data.num_val=10"])
    assert (cfg.data.name, cfg.data.synthetic, cfg.data.format) == ("preference", "preference", "preference")
    dm = FineTuneDataModule(cfg.data)
    assert len(dm.train_records) == 30 and len(dm.val_records) == 10 and dm.has_pairs
    for r in dm.val_records:
        assert r["messages"][-1]["content"] == r["answer"] != r["rejected"][-1]["content"]
        assert r["messages"][:-1] == r["rejected"][:-1] and r["task"] in TASKS
    assert not FineTuneDataModule({"num_train": 8, "num_val": 4}).has_pairs


def test_preference_cli_writes_the_pairs(tmp_path: Path) -> None:
    from ftlab.data import synthetic

    synthetic.main(["--out", str(tmp_path), "--num-train", "6", "--num-val", "3", "--preference"])
    rows = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert rows == preference_splits(6, 3, 0)[1]
    assert detect_format(read_rows(tmp_path / "train.jsonl"), "t") == "preference"


# ---------------------------------------------------------------- pair batches


def _pairs_file(path: Path, n: int = 12) -> Path:
    """Short chosen answers, rejected ones of several lengths (the sides get different widths)."""
    write_jsonl(path, [{"prompt": f"Question number {i}?", "chosen": f"yes {i}",
                        "rejected": " ".join(["no"] * (1 + 3 * (i % 4))) + f" {i}"} for i in range(n)])
    return path


def test_pair_batches_shapes_padding_and_labels(tok, tmp_path: Path) -> None:
    dm = _module(tok, path=str(_pairs_file(tmp_path / "p.jsonl")), val_ratio=0.25)
    pad = pad_id_of(tok)
    for loader, records in ((dm.train_dataloader(), dm.train_records), (dm.val_dataloader(), dm.val_records)):
        seen, widths = [], []
        for batch in loader:
            assert set(batch) == set(PAIR_KEYS)
            assert all(v.dtype == torch.long for v in batch.values())
            for side in ("chosen", "rejected"):
                ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
                assert ids.shape == mask.shape == labels.shape and ids.shape[0] == len(batch["index"])
                lengths = mask.sum(1)
                assert ids.shape[1] == int(lengths.max())  # padded to this side's own width
                for row, n in enumerate(lengths.tolist()):
                    assert mask[row, :n].all() and not mask[row, n:].any()
                    assert (ids[row, n:] == pad).all() and (labels[row, n:] == IGNORE_INDEX).all()
                    record = records[int(batch["index"][row])]
                    answer = (record["messages"] if side == "chosen" else record["rejected"])[-1]["content"]
                    assert _decoded_labels(tok, labels[row]) == answer + "<|im_end|>"
                    full = tok.decode(ids[row, :n].tolist())
                    assert full.endswith(f"assistant\n{answer}<|im_end|>\n")
            widths.append((batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1]))
            seen += batch["index"].tolist()
        assert sorted(seen) == list(range(len(records)))
        assert any(c != r for c, r in widths)


def test_pair_labels_cover_the_final_answer_only(tok, tmp_path: Path) -> None:
    path = tmp_path / "multi.jsonl"
    prompt = _chat(("user", "Hi"), ("assistant", "Hello, how can I help?"), ("user", "Name a colour"))
    write_jsonl(path, [{"prompt": prompt, "chosen": f"red {i}", "rejected": f"seven {i}"} for i in range(4)])
    paired = _module(tok, path=str(path), val_ratio=0.0)
    batch = next(iter(paired.train_dataloader()))
    i = int(batch["index"][0])
    assert _decoded_labels(tok, batch["chosen_labels"][0]) == f"red {i}<|im_end|>"
    assert _decoded_labels(tok, batch["rejected_labels"][0]) == f"seven {i}<|im_end|>"
    # supervised fine-tuning on the same data trains on every assistant turn of the chosen chat
    sft = _module(tok, pairs=False, path=str(path), val_ratio=0.0)
    labels = next(iter(sft.train_dataloader()))["labels"][0]
    assert _decoded_labels(tok, labels).startswith("Hello, how can I help?<|im_end|>")


def test_val_pairs_records_match_the_batch_index(tok, tmp_path: Path) -> None:
    dm = _module(tok, path=str(_pairs_file(tmp_path / "p.jsonl")), val_ratio=0.25)
    pairs = dm.val_pairs
    assert [p["index"] for p in pairs] == list(range(len(dm.val_records))) == list(range(3))
    batch = next(iter(dm.val_dataloader()))
    for row, index in enumerate(batch["index"].tolist()):
        p = pairs[index]
        assert p["prompt"] == dm.val_records[index]["messages"][:-1]
        assert [m["role"] for m in p["chosen"]] == ["assistant"] == [m["role"] for m in p["rejected"]]
        assert _decoded_labels(tok, batch["chosen_labels"][row]) == p["chosen"][0]["content"] + "<|im_end|>"
        assert _decoded_labels(tok, batch["rejected_labels"][row]) == p["rejected"][0]["content"] + "<|im_end|>"
    assert len(dm.pair_records("train")) == len(dm.train_records)


def test_truncation_drops_a_pair_whose_side_loses_its_answer(tok, tmp_path: Path) -> None:
    """Every third pair's rejected side is a whole conversation with a long system turn first:
    cut to the longest chosen side, that side loses its answer and the pair goes; a long shared
    prompt takes both answers (and the pair) too."""
    path = tmp_path / "t.jsonl"
    long_system = " ".join(["background"] * 30)
    rows = []
    for i in range(12):
        question = f"Question {i}?" if i != 4 else "Question 4? " + " ".join(["padding"] * 60)
        rejected = f"no {i}" if i % 3 else _chat(("system", long_system), ("user", question), ("assistant", f"no {i}"))
        rows.append({"prompt": question, "chosen": f"yes {i}", "rejected": rejected})
    write_jsonl(path, rows)
    full = _module(tok, path=str(path), val_ratio=0.0)
    lengths = {ex["index"]: len(ex["chosen_input_ids"]) for ex in full.train_dataset.examples}
    cut = max(n for i, n in lengths.items() if i != 4)  # every chosen side but the long prompt's fits
    dm = _module(tok, path=str(path), val_ratio=0.0, max_length=cut)
    kept = sorted(ex["index"] for ex in dm.train_dataset.examples)
    assert kept == [i for i in range(12) if i % 3 and i != 4]
    report = dm.length_reports[0]
    reason = f"no answer tokens left in the chosen or the rejected side after truncation to max_length={cut}"
    assert report.dropped == {reason: 5} and report.kept == 7 and report.rows == 12
    for ex in dm.train_dataset.examples:
        assert len(ex["chosen_input_ids"]) <= cut and len(ex["rejected_input_ids"]) <= cut


def test_pair_encoding_has_its_own_cache_entry(tok, tmp_path: Path) -> None:
    path = str(_pairs_file(tmp_path / "p.jsonl"))
    plain = _module(tok, cache_dir=tmp_path, pairs=False, path=path, val_ratio=0.25)
    assert plain.cache_hits == {"train": False, "validation": False}
    paired = _module(tok, cache_dir=tmp_path, path=path, val_ratio=0.25)
    assert paired.cache_hits == {"train": False, "validation": False}  # not the unpaired entry
    again = _module(tok, cache_dir=tmp_path, path=path, val_ratio=0.25)
    assert again.cache_hits == {"train": True, "validation": True}
    assert again.train_dataset.examples == paired.train_dataset.examples
    assert set(paired.train_dataset.examples[0]) == set(PAIR_KEYS)
    names = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "tokenized").iterdir() if p.is_dir())
    assert names == ["synthetic-train", "synthetic-train-pairs", "synthetic-validation", "synthetic-validation-pairs"]


def test_packing_with_pairs_is_an_error(tok, tmp_path: Path) -> None:
    path = str(_pairs_file(tmp_path / "p.jsonl"))
    dm = FineTuneDataModule({"path": path, "packing": True})
    with _raises("data.packing=true cannot be used with preference pairs: each side of a pair is its own"
                 " padded sequence; set data.packing=false"):
        dm.connect(tok, pairs=True)
    dm.connect(tok, pairs=True, packing=False)  # a caller that switched packing off for the method
    dm.setup()
    assert dm.packing_stats is None and "chosen_input_ids" in next(iter(dm.train_dataloader()))


def test_pairs_on_data_without_a_rejected_side_say_what_the_data_is(tok, tmp_path: Path) -> None:
    dm = FineTuneDataModule({"num_train": 8, "num_val": 4})
    with _raises("data 'synthetic': the method needs preference pairs, prompt/chosen/rejected rows"
                 " (data.format=preference, or data=preference), but the training data has chat examples"
                 " (keys: task, answer, messages; first: synthetic instructions train row 1)"):
        dm.connect(tok, pairs=True)
    topics = FineTuneDataModule({"synthetic": "topics", "format": "classification", "num_train": 8, "num_val": 4})
    with pytest.raises(DataError, match=r"but the training data has classification examples \(keys: text, label;"):
        topics.connect(tok, pairs=True)
    with pytest.raises(DataError, match=r"the method needs preference pairs"):
        dm.val_pairs
    with pytest.raises(DataError, match=r"^data 'synthetic': method 'dpo' needs preference pairs, .* but the training"):
        dm.check_pairs("dpo")  # before any tokenizer: a run refuses a pair method early
    FineTuneDataModule({"synthetic": "preference", "num_train": 8, "num_val": 4}).check_pairs("dpo")
    # a mix where one source has no rejected side
    pairs = _pairs_file(tmp_path / "p.jsonl")
    plain = tmp_path / "q.jsonl"
    write_jsonl(plain, [{"prompt": f"q {i}", "completion": f"a {i}"} for i in range(12)])
    mixed = FineTuneDataModule({"mix": [{"path": str(pairs)}, {"path": str(plain)}], "val_ratio": 0.25})
    with pytest.raises(DataError, match=r"but the training data has 9 of 18 examples without one: chat examples"):
        mixed.connect(tok, pairs=True)


def test_mixed_preference_sources_prefix_both_sides(tok, tmp_path: Path) -> None:
    a = _pairs_file(tmp_path / "a.jsonl")
    dm = _module(tok, mix=[{"path": str(a), "prefix": "[P] "}], val_ratio=0.25)
    for r in dm.train_records:
        assert r["messages"][0]["content"].startswith("[P] ") and r["rejected"][0] == r["messages"][0]
    assert len(dm.train_dataset) == len(dm.train_records)


# ---------------------------------------------------------------- supervised methods on preference data


def test_sft_on_preference_data_trains_on_the_chosen_answer(tok) -> None:
    dm = _module(tok, pairs=False, synthetic="preference", format="preference", num_train=12, num_val=4)
    assert dm.kind == "chat" and dm.has_pairs and dm.summary().get("pairs") is None
    for loader, records in ((dm.train_dataloader(), dm.train_records), (dm.val_dataloader(), dm.val_records)):
        batch = next(iter(loader))
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        answers = {_decoded_labels(tok, row) for row in batch["labels"]}
        chosen = {r["answer"] + "<|im_end|>" for r in records}
        rejected = {r["rejected"][-1]["content"] + "<|im_end|>" for r in records}
        assert answers <= chosen and not answers & rejected


def test_sft_method_runs_on_data_preference(tiny_cfg, tmp_path: Path) -> None:
    from ftlab.build import build
    from ftlab.train import fit

    run = build(tiny_cfg("data=preference", "method=lora", steps=2))
    assert not run.datamodule.pairs and run.datamodule.has_pairs
    result = fit(run, tmp_path)
    assert all(torch.isfinite(torch.tensor(result["train_losses"])))
    assert result["data"]["kind"] == "chat"
