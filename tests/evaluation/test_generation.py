"""Answer checkers, greedy generation on every kind of model a method produces, scoring, the base
score cache and the sample-generation callback, on the tiny random Llama."""

from __future__ import annotations

import functools
import json
from importlib import metadata
from pathlib import Path

import peft
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ftlab.evaluation import checkers
from ftlab.models import loading as models
from ftlab.evaluation.checkers import discover_checkers, get_checker
from ftlab.data.chat_masking import encode_chat, encode_prompt
from ftlab.data.datamodule import PadCollator
from ftlab.data.synthetic import generate as synthetic_records
from ftlab.data.synthetic import make_record
from ftlab.errors import ConfigError
from ftlab.evaluation.generation import (
    GenerationScore,
    base_score_cached,
    generate,
    generate_batch,
    generate_ids,
    generation_config,
    reference_answer,
    score_generations,
    stop_token_ids,
    until_stop,
)
from ftlab.models.quant import count_quantized_linear
from ftlab.plugins import Discovered

FACTS = [  # three short prompts the tiny model memorises in a few dozen steps
    make_record("add", "What is 12 + 30?\nAnswer with the number only.", "42"),
    make_record("uppercase", "Convert to uppercase: red cat\nAnswer with the converted text only.", "RED CAT"),
    make_record("extract_year", "Extract the year: Bob moved in 1999.\nAnswer with the year only.", "1999"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def chaotic_path(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with large random weights: its fresh init answers every prompt with the
    same newlines, which would hide a padding or position bug; these weights make each
    answer depend on every prompt token and its position."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_path))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    folder = tmp_path_factory.mktemp("chaotic")
    model.save_pretrained(folder)
    models.load_tokenizer(tiny_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tiny_path: Path):
    return models.load_tokenizer(tiny_path)


def load(path: Path, nf4: bool = False):
    if not nf4:
        return AutoModelForCausalLM.from_pretrained(str(path))
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=quantization, device_map={"": "cpu"})


def records_of_different_lengths() -> list[dict]:
    return synthetic_records(5, seed=0, tasks=["add", "extract_email", "reverse_words", "to_json", "count_words"])


# -- checkers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,prediction,reference,expected",
    [
        ("exact", " 42\n", "42", True),
        ("exact", "42.", "42", False),
        ("exact", "red cat", "RED CAT", False),
        ("normalized", "  Red   CAT.\n", "red cat", True),
        ("normalized", "red\tcat", "red cat", True),
        ("normalized", "red dog", "red cat", False),
        ("normalized", "red cat!", "red cat", False),
        ("number", "The answer is 42.", "42", True),
        ("number", "42.0", "42", True),
        ("number", "-7 degrees", "-7", True),
        ("number", "41 or 42", "42", False),
        ("number", "forty-two", "42", False),
        ("number", "42", "forty-two", False),
        ("json", '{"age": 30, "name": "Bob"}', '{"name": "Bob", "age": 30}', True),
        ("json", '{"name":"Bob","age":30}', '{"name": "Bob", "age": 31}', False),
        ("json", '{"name": "Bob", "age": 30', '{"name": "Bob", "age": 30}', False),
        ("json", "true", "1", False),
        ("json", "[1, 2]", "[1, 2]", True),
    ],
)
def test_builtin_checkers(name: str, prediction: str, reference: str, expected: bool) -> None:
    assert get_checker(name)(prediction, reference) is expected


def test_builtin_checkers_come_through_the_entry_point_group() -> None:
    assert {"exact", "normalized", "number", "json"} <= set(discover_checkers().found)
    eps = {ep.name: ep.value for ep in metadata.entry_points(group=checkers.ENTRY_POINT_GROUP)}
    assert eps["json"] == "ftlab.evaluation.checkers:json_equal"


def test_unknown_checker_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"^unknown checker 'exakt'\. Installed checkers: exact, json, normalized, number"):
        get_checker("exakt")


def test_broken_checker_plugin_is_named_with_its_error(monkeypatch) -> None:
    group = checkers.ENTRY_POINT_GROUP
    eps = [
        metadata.EntryPoint("exact", "ftlab.evaluation.checkers:exact", group),
        metadata.EntryPoint("fuzzy", "ftlab_no_such_plugin.checks:fuzzy", group),
        metadata.EntryPoint("constant", "ftlab.evaluation.checkers:ENTRY_POINT_GROUP", group),
    ]
    registry = discover_checkers(eps)
    assert set(registry.found) == {"exact"}
    assert "ModuleNotFoundError" in registry.broken["fuzzy"]
    assert registry.broken["constant"] == "ftlab.evaluation.checkers:ENTRY_POINT_GROUP: not callable (got str 'ftlab.checkers')"
    monkeypatch.setattr(checkers, "discover_checkers", lambda: registry)
    with pytest.raises(ConfigError, match=r"checker 'fuzzy' is installed but could not be loaded: .*ftlab_no_such_plugin"):
        get_checker("fuzzy")
    with pytest.raises(ConfigError, match=r"^unknown checker 'nope'\. Installed checkers: exact\. Broken plugins: constant \(.*\); fuzzy \(.*ModuleNotFoundError"):
        get_checker("nope")


# -- generate ------------------------------------------------------------------------------------


def test_reference_answer_is_the_last_assistant_message() -> None:
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    assert reference_answer(chat) == "d"
    assert reference_answer({"messages": [{"role": "user", "content": "a"}]}) is None


def test_stops_at_the_templates_end_of_turn_token(tokenizer) -> None:
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def greedy_reference(model, tokenizer, records: list[dict], max_new_tokens: int, **inputs) -> list[list[int]]:
    """Greedy decoding one record at a time by full forward passes: no padding, no cache."""
    stop = stop_token_ids(tokenizer, model)
    answers = []
    model.eval()
    with torch.no_grad():
        for record in records:
            ids = torch.tensor([encode_prompt(tokenizer, record["messages"])])
            new: list[int] = []
            while len(new) < max_new_tokens:
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits
                token = int(logits[0, -1].argmax())
                if token in stop:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            answers.append(new)
    return answers


def lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def prompt_tuning(model):
    return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))


def prefix_tuning(model):
    return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))


def multitask_prompt(model):
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6, num_tasks=2, num_ranks=1)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():  # the per-task scalings start equal; make task 1 differ from task 0
        model.prompt_encoder["default"].prefix_task_cols[1].normal_(0, 1)
    return model


def task_one(batch: dict) -> dict:
    """A method's ``model_inputs`` hook, as multitask prompt tuning has one."""
    return {**batch, "task_ids": torch.ones(batch["input_ids"].shape[0], dtype=torch.long)}


KINDS = {"plain": lambda m: m, "lora": lora, "prompt_tuning": prompt_tuning, "prefix_tuning": prefix_tuning,
         "multitask_prompt": multitask_prompt, "nf4_lora": lora}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.filterwarnings("ignore")
def test_batched_generation_equals_unpadded_greedy_decoding(chaotic_path: Path, tokenizer, kind: str) -> None:
    torch.manual_seed(0)
    base = load(chaotic_path, nf4=kind == "nf4_lora")
    if kind == "nf4_lora":
        assert count_quantized_linear(base)["linear4bit"] > 0
    model = KINDS[kind](base)
    hook = task_one if kind == "multitask_prompt" else None
    extra = task_one({"input_ids": torch.zeros(1, 1)}) if hook else {}
    extra.pop("input_ids", None)
    records = records_of_different_lengths()
    assert len({len(encode_prompt(tokenizer, r["messages"])) for r in records}) == len(records)
    model.train()
    side = tokenizer.padding_side

    batched = generate_ids(model, tokenizer, records, max_new_tokens=6, batch_size=4, model_inputs=hook)

    assert model.training and all(m.training for m in model.modules())
    assert tokenizer.padding_side == side
    expected = greedy_reference(model, tokenizer, records, max_new_tokens=6, **extra)
    assert batched == expected
    assert len({tuple(a) for a in expected}) > 1, "the answers do not depend on the prompt: the check is vacuous"
    assert generate(model, tokenizer, records[:2], max_new_tokens=6, model_inputs=hook) == [
        tokenizer.decode(a, skip_special_tokens=True) for a in expected[:2]
    ]


def test_prompt_tuning_answer_depends_on_the_soft_prompt(chaotic_path: Path, tokenizer) -> None:
    """Generating through the base model must not leave the soft prompt behind."""
    torch.manual_seed(0)
    model = prompt_tuning(load(chaotic_path))
    records = records_of_different_lengths()[:2]
    before = generate_ids(model, tokenizer, records, max_new_tokens=6)
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.mul_(-1)
    assert generate_ids(model, tokenizer, records, max_new_tokens=6) != before


def test_leaves_eval_submodules_in_eval_mode(tiny_path: Path, tokenizer) -> None:
    model = load(tiny_path).train()
    model.model.layers[0].eval()
    generate(model, tokenizer, FACTS[:1], max_new_tokens=2)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training


class RecordingModel(torch.nn.Module):
    """Stands in for a model: records what ``generate`` is given and answers each row with 7, 8, 9."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def generate(self, input_ids, **kwargs):
        self.calls.append({"input_ids": input_ids, **kwargs})
        return torch.cat([input_ids, torch.tensor([[7, 8, 9]] * input_ids.shape[0])], dim=1)


def test_generate_batch_left_pads_adds_the_methods_inputs_and_passes_generate_arguments() -> None:
    model = RecordingModel()
    config = generation_config(5, stop=[8], pad_id=0)
    streamer = object()

    new = generate_batch(model, [[1, 2, 3], [4]], config, pad_id=0, model_inputs=task_one, streamer=streamer)

    assert new == [[7, 8, 9], [7, 8, 9]]  # the new tokens only, stop token and all
    (call,) = model.calls
    assert call["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert call["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert call["task_ids"].tolist() == [1, 1] and call["streamer"] is streamer
    assert call["generation_config"] is config and "labels" not in call


def test_until_stop_and_generation_config() -> None:
    assert until_stop([5, 6, 2, 7, 2], [2, 9]) == [5, 6] and until_stop([5, 6], [2]) == [5, 6]
    greedy = generation_config(4, stop=[2, 3], pad_id=1)
    assert (greedy.do_sample, greedy.num_beams, greedy.max_new_tokens, greedy.eos_token_id, greedy.pad_token_id) == (
        False, 1, 4, [2, 3], 1)
    sampled = generation_config(4, stop=[2], pad_id=1, do_sample=True, temperature=0.7)
    assert sampled.do_sample and sampled.temperature == 0.7


def test_prompts_are_padded_with_eos_when_the_tokenizer_has_no_pad_token(tiny_path: Path) -> None:
    """The data module's fallback (``pad_id_of``): generation needs no pad token either."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_path))
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None
    records = records_of_different_lengths()[:2]  # of different lengths: one prompt is padded
    answers = generate_ids(load(tiny_path), tokenizer, records, max_new_tokens=2, batch_size=2)
    assert len(answers) == 2


# -- score_generations ---------------------------------------------------------------------------


def train_to_answer(model, tokenizer, records: list[dict], steps: int) -> None:
    batch = PadCollator(tokenizer.pad_token_id)([encode_chat(tokenizer, r["messages"], 128) for r in records])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


def test_score_goes_from_zero_to_one_once_the_answers_are_learnt(tiny_path: Path, tokenizer) -> None:
    torch.manual_seed(0)
    model = load(tiny_path)
    before = score_generations(model, tokenizer, FACTS, checker="exact")
    assert (before.score, before.correct, before.total) == (0.0, 0, 3)

    train_to_answer(model, tokenizer, FACTS, steps=50)
    after = score_generations(model, tokenizer, FACTS, checker="exact", num_samples=2)

    assert (after.score, after.correct, after.total, after.checker) == (1.0, 3, 3, "exact")
    assert after.samples == [
        {"prompt": r["messages"][0]["content"], "reference": r["answer"], "prediction": r["answer"], "correct": True}
        for r in FACTS[:2]
    ]


def test_score_counts_what_the_checker_says_and_skips_records_without_reference(
    tiny_path: Path, tokenizer, monkeypatch
) -> None:
    seen: list[tuple[str, str]] = []

    def by_reference(prediction: str, reference: str) -> bool:
        seen.append((prediction, reference))
        return reference != "42"

    registry = Discovered("checker", ConfigError, {"by_reference": by_reference})
    monkeypatch.setattr(checkers, "discover_checkers", lambda: registry)
    unanswered = {"messages": [{"role": "user", "content": "no reference here"}]}
    score = score_generations(load(tiny_path), tokenizer, [*FACTS, unanswered], checker="by_reference", max_new_tokens=3)

    assert (score.score, score.correct, score.total, score.checker) == (pytest.approx(2 / 3), 2, 3, "by_reference")
    assert [r for _, r in seen] == ["42", "RED CAT", "1999"]
    assert [s["correct"] for s in score.samples] == [False, True, True]
    assert [s["prediction"] for s in score.samples] == [p for p, _ in seen]


# -- base_score_cached ---------------------------------------------------------------------------


def test_base_score_is_computed_once_per_key(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> GenerationScore:
        calls.append(1)
        return GenerationScore(0.5, 1, 2, "exact", [{"prompt": "p", "reference": "r", "prediction": "x", "correct": False}])

    key = {"checkpoint": "tiny-abc", "quantization": "none", "records": "sha:1", "checker": "exact", "max_new_tokens": 16}
    first, hit = base_score_cached(tmp_path, key, compute)
    assert (hit, len(calls)) == (False, 1)
    again, hit = base_score_cached(tmp_path, dict(reversed(list(key.items()))), compute)
    assert (hit, len(calls), again) == (True, 1, first)
    _, hit = base_score_cached(tmp_path, {**key, "quantization": "nf4"}, compute)
    assert (hit, len(calls)) == (False, 2)

    files = sorted((tmp_path / "base_eval").glob("*.json"))
    assert len(files) == 2 and not list((tmp_path / "base_eval").glob(".*tmp*"))
    stored = [json.loads(f.read_text()) for f in files]
    assert {s["key"]["quantization"] for s in stored} == {"none", "nf4"}
    assert all(s["score"]["score"] == 0.5 and s["score"]["samples"][0]["prediction"] == "x" for s in stored)


# -- GenerationSamples ---------------------------------------------------------------------------


def test_samples_are_logged_at_every_validation(tiny_path: Path, tokenizer, tmp_path: Path) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from ftlab.methods.full import Full, FullConfig
    from ftlab.module import FineTuneModule
    from ftlab.evaluation.samples import GenerationSamples

    records = synthetic_records(6, seed=1)
    examples = [encode_chat(tokenizer, r["messages"], 128) for r in records]
    loader = DataLoader(examples, batch_size=2, collate_fn=PadCollator(tokenizer.pad_token_id))
    torch.manual_seed(0)
    model = load(tiny_path)
    module = FineTuneModule(model, Full(FullConfig(name="full", lr=1e-3)), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    out_file = tmp_path / "run" / "samples.jsonl"
    samples = GenerationSamples(records, tokenizer, num_samples=3, max_new_tokens=4, out_file=out_file)
    trainer = pl.Trainer(
        max_steps=2, val_check_interval=1, limit_val_batches=1, logger=TensorBoardLogger(tmp_path / "tb"),
        callbacks=[samples], enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        accelerator="cpu", devices=1, log_every_n_steps=1,
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)

    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]  # none from the sanity check
    assert [r["prompt"] for r in rows[:3]] == [r["messages"][0]["content"] for r in records[:3]]
    assert all(set(r) == {"step", "prompt", "reference", "prediction", "correct"} for r in rows)
    assert all(r["correct"] == (r["prediction"].strip() == r["reference"].strip()) for r in rows)
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(module.train_losses) == 2 and trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "training did not run"
    assert model.training

    rng = torch.get_rng_state()
    samples.on_validation_end(trainer, module)
    assert torch.equal(torch.get_rng_state(), rng)


def test_samples_reject_an_unknown_checker(tokenizer) -> None:
    from ftlab.evaluation.samples import GenerationSamples

    with pytest.raises(ConfigError, match="unknown checker 'exct'"):
        GenerationSamples(FACTS, tokenizer, checker="exct")


def test_samples_go_to_every_logger_that_takes_text(tiny_path: Path, tokenizer, tmp_path: Path) -> None:
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    from ftlab.evaluation.samples import GenerationSamples

    tensorboard, wandb, csv = MagicMock(spec=TensorBoardLogger), MagicMock(spec=WandbLogger), MagicMock(spec=CSVLogger)
    record = make_record("x", "a | b\nc", "A|B")
    samples = GenerationSamples([record, *FACTS], tokenizer, num_samples=2, max_new_tokens=2)
    module = SimpleNamespace(model=load(tiny_path), device=torch.device("cpu"))
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=7, loggers=[tensorboard, wandb, csv])

    samples.on_validation_end(trainer, module)

    tag, table, step = tensorboard.experiment.add_text.call_args.args
    assert (tag, step) == ("samples", 7)
    lines = table.splitlines()
    assert lines[0] == "| step | prompt | reference | prediction | correct |" and len(lines) == 4
    assert lines[2].startswith("| 7 | a \\| b<br>c | A\\|B | ")
    kwargs = wandb.log_text.call_args.kwargs
    assert (kwargs["key"], kwargs["step"], kwargs["columns"]) == ("samples", 7, ["step", "prompt", "reference", "prediction", "correct"])
    assert [row[:3] for row in kwargs["data"]] == [[7, "a | b\nc", "A|B"], [7, FACTS[0]["messages"][0]["content"], "42"]]
    assert not csv.method_calls

    trainer.sanity_checking = True
    samples.on_validation_end(trainer, module)
    trainer.sanity_checking, trainer.is_global_zero = False, False
    samples.on_validation_end(trainer, module)
    assert wandb.log_text.call_count == 1 and tensorboard.experiment.add_text.call_count == 1
