"""``ftlab export``, ``generate`` and ``chat``: a trained run leaves artifacts that plain
transformers/peft load, with no ftlab, and that compute what the run's model computed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16

from ftlab.deploy.export import ExportError, export_run

METHODS = ("lora", "qlora", "ia3", "prompt")
MERGEABLE = ("lora", "qlora", "ia3")
# An adapter export holds the very tensors the run saved, loaded onto the same base by the same
# PEFT code: the logits agree to float32 rounding of identical operations (measured: 0).
ADAPTER_ATOL = 1e-5
# Merging folds W + BA into one matrix, which rounds differently from computing both paths
# (measured: ~4e-7 on the tiny model); GGUF F32 holds the merged weights bit for bit.
MERGED_ATOL = 1e-4
# Plain bitsandbytes inference on a CPU with AVX512-BF16 repacks 4-bit weights, rounding their
# absmax to bf16 and computing in bf16 (ftlab keeps the standard layout; docs/methods.md): a QLoRA
# adapter loaded there with plain PEFT differs by that rounding (measured: 3.8e-3 on the tiny model).
PACKED_ATOL = 2e-2
REPACKING_CPU = not torch.cuda.is_available() and has_avx512bf16()
PROMPT = "Reverse the word: lamp"

# Runs in a fresh interpreter that cannot import ftlab: what a user without ftlab has.
PLAIN_LOADER = r'''
import importlib.abc, json, sys

class NoFtlab(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ftlab" or name.startswith("ftlab."):
            raise ImportError("ftlab must not be needed to load an export")

sys.meta_path.insert(0, NoFtlab())
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

spec = json.loads(open(sys.argv[1]).read())
ids = torch.tensor([spec["ids"]])
logits, token_ids = {}, {}
for name, folder in spec["adapters"].items():
    config = json.load(open(f"{folder}/adapter_config.json"))
    quant = json.load(open(f"{folder}/ftlab_export.json")).get("quantization_config")
    base = AutoModelForCausalLM.from_pretrained(
        config["base_model_name_or_path"], quantization_config=BitsAndBytesConfig(**quant) if quant else None,
        device_map={"": "cpu"} if quant else None)
    model = PeftModel.from_pretrained(base, folder).eval()
    if quant:  # first in the standard 4-bit layout, before bitsandbytes may repack it for CPU inference
        import bitsandbytes as bnb
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        repacks = [m.support_avx512bf16_for_cpu for m in layers]
        for layer in layers:
            layer.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            logits[name + "@standard_layout"] = model(input_ids=ids).logits
        for layer, repack in zip(layers, repacks):
            layer.support_avx512bf16_for_cpu = repack
    with torch.no_grad():
        logits[name] = model(input_ids=ids).logits
for name, folder in spec["models"].items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits[name] = model(input_ids=ids).logits
for name, (folder, file) in spec["gguf"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file).eval()
    with torch.no_grad():
        logits[name] = model(input_ids=ids).logits
    token_ids[name] = AutoTokenizer.from_pretrained(folder, gguf_file=file)(spec["text"])["input_ids"]
torch.save({"logits": logits, "token_ids": token_ids, "ftlab_imported": "ftlab" in sys.modules}, spec["out"])
'''


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only spin-waits


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ftlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftlab", *args], capture_output=True, text=True, timeout=600,
                          env=ONE_THREAD)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """One short run per method, trained in one sweep (one interpreter start for all four)."""
    sweep = tmp_path_factory.mktemp("runs")
    out = _ftlab("-m", f"method={','.join(METHODS)}", "model=tiny", "trainer.max_steps=2", "data.num_train=32",
                 "data.num_val=8", "eval.num_prompts=2", "eval.num_samples=0", "eval.max_new_tokens=4",
                 "logger=none", "callbacks=none", "~hydra.callbacks.compare", f"hydra.sweep.dir={sweep}",
                 f"paths.cache_dir={cache_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    return {m: sweep / f"{i}_{m}" for i, m in enumerate(METHODS)}


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``<method>``: the adapter export; ``<method>_merged``: the merged model (lora's with GGUF)."""
    root = tmp_path_factory.mktemp("exports")
    made = {m: export_run(runs[m], root / m).out for m in METHODS}
    for m in MERGEABLE:
        made[f"{m}_merged"] = export_run(runs[m], root / f"{m}_merged", merge=True, gguf=m == "lora").out
    return made


@pytest.fixture(scope="module")
def probe(runs: dict[str, Path]) -> tuple[list[int], str]:
    """Fixed input ids (a chat prompt with special tokens and digits) and their text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(runs["lora"] / "adapter")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Add 17 and 25, then say done."}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"], text


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def reference(runs: dict[str, Path], probe) -> dict[str, torch.Tensor]:
    """Logits of each run's trained model as ftlab loads it, and QLoRA's adapter on the dequantized
    base (what a merge into dequantized weights must reproduce)."""
    from peft import PeftModel

    from ftlab.deploy.run_loading import open_run

    ids, _ = probe
    refs = {m: _logits(open_run(runs[m]).load().model, ids) for m in METHODS}
    finished = open_run(runs["qlora"])
    _, base, _ = finished.load_base()
    refs["qlora_dequantized"] = _logits(PeftModel.from_pretrained(base.dequantize(), runs["qlora"] / "adapter"), ids)
    return refs


@pytest.fixture(scope="module")
def plain(exports: dict[str, Path], probe, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every export loaded in one fresh interpreter with transformers/peft/torch only."""
    ids, text = probe
    folder = tmp_path_factory.mktemp("plain")
    spec = {"ids": ids, "text": text, "out": str(folder / "logits.pt"),
            "adapters": {m: str(exports[m]) for m in METHODS},
            "models": {f"{m}_merged": str(exports[f"{m}_merged"]) for m in MERGEABLE},
            "gguf": {"lora_gguf": [str(exports["lora_merged"]), "model.gguf"]}}
    (folder / "spec.json").write_text(json.dumps(spec))
    (folder / "load.py").write_text(PLAIN_LOADER)
    out = subprocess.run([sys.executable, str(folder / "load.py"), str(folder / "spec.json")], cwd=folder,
                         capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(folder / "logits.pt")


def test_loading_exports_needs_no_ftlab(plain: dict) -> None:
    assert plain["ftlab_imported"] is False


@pytest.mark.parametrize("method", METHODS)
def test_adapter_export_loads_with_plain_peft(method: str, plain: dict, reference: dict, exports, cache_dir) -> None:
    from ftlab.models.tiny import TINY_DEFAULTS, tiny_checkpoint

    got, want = plain["logits"][method], reference[method]
    assert got.shape == want.shape
    if method == "qlora":
        standard = plain["logits"][f"{method}@standard_layout"]
        assert torch.allclose(standard, want, atol=ADAPTER_ATOL, rtol=0), (standard - want).abs().max()
    atol = PACKED_ATOL if method == "qlora" and REPACKING_CPU else ADAPTER_ATOL
    assert torch.allclose(got, want, atol=atol, rtol=0), (got - want).abs().max()
    config = json.loads((exports[method] / "adapter_config.json").read_text())
    tiny = tiny_checkpoint({"kind": "tiny", **TINY_DEFAULTS}, cache_dir)
    assert config["base_model_name_or_path"] == str(tiny.resolve())
    assert {"adapter_model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= {
        p.name for p in exports[method].iterdir()}


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_export_loads_with_plain_transformers(method: str, plain: dict, reference: dict, exports) -> None:
    want = reference["qlora_dequantized" if method == "qlora" else method]
    got = plain["logits"][f"{method}_merged"]
    assert torch.allclose(got, want, atol=MERGED_ATOL, rtol=0), (got - want).abs().max()
    folder = exports[f"{method}_merged"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= {
        p.name for p in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]  # <|im_end|>: the end of the assistant's turn


def test_qlora_merge_says_it_dequantized(exports) -> None:
    card = (exports["qlora_merged"] / "README.md").read_text()
    assert "dequantized to float32" in card and "nf4" in card
    assert json.loads((exports["qlora_merged"] / "ftlab_export.json").read_text())["dequantized"] is True


def test_gguf_reads_back_with_the_same_logits_and_tokens(plain: dict, reference: dict, probe) -> None:
    got = plain["logits"]["lora_gguf"]
    assert torch.allclose(got, reference["lora"], atol=MERGED_ATOL, rtol=0), (got - reference["lora"]).abs().max()
    assert plain["token_ids"]["lora_gguf"] == probe[0]


def test_model_card_names_method_base_data_and_commands(exports, runs, cache_dir) -> None:
    from omegaconf import OmegaConf

    from ftlab.cache import fingerprint
    from ftlab.deploy.run_loading import open_run

    card = (exports["lora"] / "README.md").read_text()
    overrides = [str(o) for o in OmegaConf.load(runs["lora"] / ".hydra" / "overrides.yaml")]
    assert "python -m ftlab " + " ".join(overrides) in card
    assert f"ftlab export {runs['lora']} --out {exports['lora']}" in card
    assert "# lora fine-tune of tiny" in card and "r: 16" in card
    assert json.loads((exports["lora"] / "adapter_config.json").read_text())["base_model_name_or_path"] in card
    records = open_run(runs["lora"]).datamodule.train_records
    assert fingerprint([{k: v for k, v in r.items() if not k.startswith("_")} for r in records]) in card
    val_loss = json.loads((runs["lora"] / "metrics.json").read_text())["val_loss"]
    assert f"validation loss: {val_loss:.4f}" in card and "exact match on 2 held-out prompts" in card


def test_merge_refused_for_prompt_tuning_with_the_reason(runs, tmp_path: Path) -> None:
    from ftlab.cli import main
    from ftlab.methods.prompt_learning import PromptLearningMethod

    with pytest.raises(SystemExit) as err:
        main(["export", str(runs["prompt"]), "--out", str(tmp_path / "out"), "--merge"])
    message = str(err.value)
    assert message.startswith("ftlab: error: --merge: method 'prompt' cannot be merged")
    assert PromptLearningMethod.cannot_merge in message and "without --merge" in message
    assert not (tmp_path / "out").exists()


def test_taken_out_folder_is_refused_unless_forced(runs, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty.*--force"):
        export_run(runs["ia3"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="holds the run folder"):
        export_run(runs["ia3"], runs["ia3"].parent, force=True)
    with pytest.raises(ExportError, match="--dtype float64 is not valid; use one of: float32, bfloat16, float16"):
        export_run(runs["ia3"], tmp_path / "new", merge=True, dtype="float64")
    export_run(runs["ia3"], out, merge=True, dtype="bfloat16", force=True)
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names and "model.safetensors" in names
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def _export_error(argv: list[str]) -> str:
    """The message ``ftlab export`` exits with (one ``ftlab: error:`` line, no traceback)."""
    from ftlab.cli import main

    with pytest.raises(SystemExit) as err:
        main(["export", *argv])
    message = str(err.value)
    assert message.startswith("ftlab: error: ") and "\n" not in message and "Traceback" not in message
    return message


def _no_loading(monkeypatch) -> None:
    """A place that cannot be written is refused before the model is loaded."""
    from ftlab.deploy.run_loading import FinishedRun

    monkeypatch.setattr(FinishedRun, "load", lambda self: pytest.fail("loaded the model before checking --out"))


def test_out_under_a_file_is_one_error_line(runs, tmp_path: Path, monkeypatch) -> None:
    """Works as root too (root ignores permissions, not a file where a folder must be)."""
    _no_loading(monkeypatch)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    for out in (blocker / "export", blocker / "deeper" / "export"):
        message = _export_error([str(runs["lora"]), "--out", str(out)])
        assert message == (f"ftlab: error: cannot write the export to {out}: {blocker} is a file, not a folder;"
                           " choose another --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions: the tests of a file in the way"
                    " and of the OS refusing the folder run instead")
def test_out_in_a_read_only_folder_is_one_error_line(runs, tmp_path: Path, monkeypatch) -> None:
    _no_loading(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out in (locked / "export", locked / "a" / "export"):
            message = _export_error([str(runs["lora"]), "--out", str(out)])
            assert message.startswith(f"ftlab: error: cannot write the export to {out}: permission denied in {locked}")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_permission_denied_as_the_os_reports_it(runs, tmp_path: Path, monkeypatch) -> None:
    """What the read-only folder test checks, also as root: the OS refusing the temporary folder."""
    import errno

    import ftlab.deploy.export as export

    _no_loading(monkeypatch)

    def refused(prefix: str, dir: Path) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / f"{prefix}abc123"))

    monkeypatch.setattr(export.tempfile, "mkdtemp", refused)
    out = tmp_path / "export"
    message = _export_error([str(runs["lora"]), "--out", str(out)])
    assert message == (f"ftlab: error: cannot write the export to {out}: permission denied in {tmp_path}"
                       " (choose an --out you can write to)")
    assert list(tmp_path.iterdir()) == []


def test_a_write_failing_part_way_leaves_nothing_and_keeps_the_old_export(runs, tmp_path: Path, monkeypatch) -> None:
    import errno

    import ftlab.deploy.export as export

    out = tmp_path / "export"
    export_run(runs["ia3"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written: list[Path] = []

    def disk_full(folder: Path, facts: dict) -> None:
        written.extend(folder.iterdir())  # the weights and tokenizer are already there
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "README.md"))

    monkeypatch.setattr(export, "_write_card", disk_full)
    for target, force in ((tmp_path / "new", False), (out, True)):
        with pytest.raises(ExportError) as err:
            export_run(runs["ia3"], target, force=force)
        assert str(err.value) == (f"cannot write the export to {target}: no space left on the device holding {tmp_path};"
                                  " the partial export was removed (free space there, or choose another --out)")
    assert any(p.name == "adapter_model.safetensors" for p in written)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder, no "new"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # --force replaced nothing


def test_generate_streams_an_answer_from_an_export(exports, runs) -> None:
    from ftlab.evaluation.generation import generate
    from ftlab.deploy.run_loading import open_run

    loaded = open_run(runs["lora"]).load()
    expected = generate(loaded.model, loaded.tokenizer, [{"messages": [{"role": "user", "content": PROMPT}]}], 8)[0]
    out = _ftlab("generate", str(exports["lora_merged"]), PROMPT, "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == expected + "\n"


def test_streamed_text_is_the_greedy_answer(exports, capsys) -> None:
    """The tiny model answers with newlines only; one token made to win everywhere gives an answer
    whose streamed text can be read."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftlab.deploy.chat import Chatbot, reply

    folder = exports["lora_merged"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    token = tokenizer("lamp", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():  # tied embeddings: its output logit grows with its embedding row
        model.get_input_embeddings().weight[token] *= 50
    answer = reply(Chatbot(model.eval(), tokenizer), [{"role": "user", "content": PROMPT}], max_new_tokens=5)
    assert answer == tokenizer.decode([token] * 5) and answer.strip()
    assert capsys.readouterr().out == answer + "\n"


def test_chat_reply_adds_the_methods_inputs_pads_with_eos_and_cuts_at_the_end_of_turn(tiny_model_dir, capsys) -> None:
    """``reply`` goes through evaluation's generation helpers: the method's ``model_inputs`` reach
    ``generate``, a tokenizer without a pad token pads with EOS, the answer ends at the first stop
    token, and it streams; ``--temperature`` switches to sampling."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftlab.deploy.chat import Chatbot, reply
    from ftlab.evaluation.generation import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.pad_token = None
    inner = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    token = tokenizer("lamp", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():  # tied embeddings: one token made to win everywhere (as above)
        inner.get_input_embeddings().weight[token] *= 50
    stop = stop_token_ids(tokenizer, inner)
    calls: list[dict] = []

    class TaskModel(torch.nn.Module):
        """A model whose method adds ``task_ids`` (as multitask prompt tuning's does); it records
        them and goes on past the end of its turn."""

        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config, self.generation_config = inner, inner.config, inner.generation_config

        def generate(self, task_ids, **kwargs):
            calls.append({"task_ids": task_ids, **kwargs})
            return torch.cat([self.inner.generate(**kwargs), torch.tensor([[stop[0], token]])], dim=1)

    def task_two(batch: dict) -> dict:
        return {**batch, "task_ids": torch.full((batch["input_ids"].shape[0],), 2)}

    bot = Chatbot(TaskModel(), tokenizer, task_two)
    answer = reply(bot, [{"role": "user", "content": PROMPT}], max_new_tokens=3)

    assert answer == tokenizer.decode([token] * 3)  # not the token after the end of turn
    assert capsys.readouterr().out == answer + "\n"
    assert calls[0]["task_ids"].tolist() == [2] and calls[0]["streamer"] is not None
    config = calls[0]["generation_config"]
    assert (config.pad_token_id, config.eos_token_id, config.do_sample) == (tokenizer.eos_token_id, stop, False)
    reply(bot, [{"role": "user", "content": PROMPT}], max_new_tokens=2, temperature=0.5)
    sampled = calls[1]["generation_config"]
    assert (sampled.do_sample, sampled.temperature, sampled.max_new_tokens) == (True, 0.5, 2)


def test_generate_with_a_prompt_tuning_export_prints_the_whole_answer(exports, runs, capsys) -> None:
    from ftlab.deploy.chat import generate_once
    from ftlab.evaluation.generation import generate
    from ftlab.deploy.run_loading import open_run

    loaded = open_run(runs["prompt"]).load()
    expected = generate(loaded.model, loaded.tokenizer, [{"messages": [{"role": "user", "content": PROMPT}]}], 6)[0]
    assert generate_once(exports["prompt"], PROMPT, max_new_tokens=6) == expected
    assert capsys.readouterr().out == expected + "\n"


def test_chat_keeps_the_conversation_until_reset(runs, monkeypatch, capsys) -> None:
    import ftlab.deploy.chat as chat

    seen: list[list[dict]] = []
    real_reply = chat.reply

    def recording_reply(bot, messages, *args, **kwargs):
        seen.append([dict(m) for m in messages])
        return real_reply(bot, messages, *args, **kwargs)

    monkeypatch.setattr(chat, "reply", recording_reply)
    lines = iter(["hello", "again", "/reset", "hello"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    chat.chat_loop(chat.load_chatbot(runs["lora"]), system="Be brief.", max_new_tokens=4, read=read)
    system = {"role": "system", "content": "Be brief."}
    assert [[m["role"] for m in s] for s in seen] == [
        ["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"]]
    assert seen[1][0] == system and seen[1][-1]["content"] == "again" and seen[2] == seen[0]
    assert "(new conversation)" in capsys.readouterr().out


def test_generate_refuses_what_it_cannot_answer_with(tmp_path: Path) -> None:
    from ftlab.deploy.chat import ChatError, load_chatbot
    from ftlab.cli import main

    with pytest.raises(ChatError, match="neither a run folder"):
        load_chatbot(tmp_path)
    with pytest.raises(SystemExit, match="^ftlab: error: .*missing is not a folder; give a run folder or an export"):
        main(["generate", str(tmp_path / "missing"), "hi"])
