"""The model a config names, known before weights load: whose name a run reports, what is refused
in one line (an encoder-decoder, a path on model=tiny, a quantization bitsandbytes cannot apply,
a hub model that cannot be reached), and that a quantized load is verified, not assumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from omegaconf import OmegaConf

from ftlab.config import compose
from ftlab.errors import ConfigError, ModelLoadError
from ftlab.models.architecture import architecture, model_label
from ftlab.models.chat_templates import CHATML, set_chat_template
from ftlab.models.quant import check_quantized, unquantizable_layers
from ftlab.models.tiny import TINY_DEFAULTS, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(family: str) -> dict:
    return {"name": "tiny", "kind": "tiny", "family": family, **TINY_DEFAULTS}


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's own checkpoint: a tiny Qwen2 saved under a name of its own."""
    built = tiny_checkpoint(OmegaConf.create(_tiny("qwen2")), tmp_path_factory.mktemp("cache"))
    folder = tmp_path_factory.mktemp("models") / "my-qwen"
    folder.mkdir()
    for f in built.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _seq2seq_folder(root: Path, kind: str) -> Path:
    if kind == "t5":
        config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        model = transformers.T5ForConditionalGeneration(config)
    else:
        config = transformers.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2,
                                         encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
        model = transformers.BartForConditionalGeneration(config)
    folder = root / f"tiny-{kind}"
    model.save_pretrained(folder)
    return folder


def test_the_label_is_the_models_own_name(tmp_path: Path, qwen2_folder: Path) -> None:
    assert model_label({"kind": "tiny", "family": "gemma2"}) == "tiny-gemma2"
    assert model_label({"kind": "pretrained", "name_or_path": None}) == "SmolLM2-135M-Instruct"
    assert model_label({"kind": "pretrained", "name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"}) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert model_label({"kind": "pretrained", "name_or_path": str(qwen2_folder)}) == "my-qwen"
    arch = architecture(OmegaConf.create({"kind": "pretrained", "name_or_path": str(qwen2_folder)}), tmp_path)
    assert (arch.model_type, arch.family, arch.class_name) == ("qwen2", "qwen2", "Qwen2ForCausalLM")
    assert arch.describe() == "my-qwen (qwen2)"
    # the skeleton holds no memory: every tensor is on the meta device
    assert {p.device.type for p in arch.skeleton.parameters()} == {"meta"}


def test_a_users_folder_wins_over_the_presets_weights_and_names_the_run(tiny_cfg, qwen2_folder: Path) -> None:
    """model=llama model.name_or_path=FOLDER trains that folder (a Qwen2), and metrics.json, the
    comparison and the log say so; the preset's SmolLM2 is not loaded."""
    from ftlab.train import train

    cfg = tiny_cfg("model=llama", f"model.name_or_path={qwen2_folder}", "method=lora", "eval.generate=false", steps=2)
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert (record["status"], record["model"], record["architecture"], record["model_group"]) == \
        ("completed", "my-qwen", "qwen2", "llama")
    from ftlab.sweeps.compare import load_runs, markdown_table

    rows = load_runs([Path(cfg.paths.output_dir)])
    assert rows[0]["model"] == "my-qwen"
    assert "Model: my-qwen." in markdown_table(rows)


def test_a_path_on_the_tiny_model_is_refused(qwen2_folder: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.name_or_path=.*my-qwen is set on model=tiny, which builds random "
                                          r"weights and loads none; to train that checkpoint use model=llama"):
        compose(["model=tiny", f"model.name_or_path={qwen2_folder}"])


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_an_encoder_decoder_is_refused_before_loading(tmp_path: Path, kind: str) -> None:
    folder = _seq2seq_folder(tmp_path, kind)
    with pytest.raises(ConfigError, match=rf"model tiny-{kind} \({kind}\) is an encoder-decoder \(sequence-to-sequence\) "
                                          r"model; ftlab fine-tunes causal language models"):
        compose(["model=llama", f"model.name_or_path={folder}"])


def test_a_quantization_bitsandbytes_cannot_apply_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"quantization=nf4 cannot quantize tiny-falcon: its decoder blocks' "
                                          r"linear layers are FalconLinear, which bitsandbytes does not replace"):
        compose(["model=tiny", "model.family=falcon", "method=qlora", "quantization=nf4", f"paths.cache_dir={tmp_path}"])
    compose(["model=tiny", "model.family=falcon", "method=lora", f"paths.cache_dir={tmp_path}"])  # float: fine
    skeleton = architecture(OmegaConf.create(_tiny("gpt2")), tmp_path).skeleton
    assert unquantizable_layers(skeleton) == []  # GPT-2's Conv1D is replaced


def test_a_quantized_load_is_verified(tmp_path: Path) -> None:
    """The check after loading: a float model claimed as nf4 fails naming its layer class (the
    control), an nf4 load passes with its count of 4-bit layers."""
    from ftlab.models.loading import load_model

    falcon, _ = load_model(OmegaConf.create({**_tiny("falcon"), "dtype": "float32"}), {"name": "none"}, tmp_path)
    with pytest.raises(ConfigError, match=r"quantization=nf4 replaced no layer of tiny-falcon: its decoder blocks hold "
                                          r"FalconLinear, which bitsandbytes did not quantize"):
        check_quantized(falcon, "nf4", "tiny-falcon")
    nf4 = {"name": "nf4", "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    llama, _ = load_model(OmegaConf.create({**_tiny("llama"), "dtype": "float32"}), nf4, tmp_path)
    assert check_quantized(llama, "nf4", "tiny-llama") == 7 * TINY_DEFAULTS["num_hidden_layers"]


def test_an_unreachable_hub_model_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"cannot read the config of model Qwen/Qwen2.5-0.5B-Instruct \(not a local "
                                             r"folder, and the hub cannot be reached .*model.name_or_path=FOLDER\)"):
        compose(["model=qwen2", f"paths.cache_dir={tmp_path}"])


def test_a_preset_brings_its_template_and_a_folder_replaces_its_weights(tmp_path: Path) -> None:
    """model=gpt2 names the hub's GPT-2 and ChatML (GPT-2 has no template); a local folder
    replaces the weights and keeps the template, which the loaded tokenizer then carries."""
    from ftlab.models.loading import load_model

    folder = tiny_checkpoint(OmegaConf.create(_tiny("gpt2")), tmp_path)
    preset = OmegaConf.load(Path(__file__).parents[2] / "ftlab/conf/model/gpt2.yaml")
    assert (preset.name_or_path, preset.family, preset.chat_template) == ("openai-community/gpt2", "gpt2", "chatml")
    cfg = compose(["model=gpt2", f"model.name_or_path={folder}", f"paths.cache_dir={tmp_path}"])
    assert (cfg.model.name_or_path, cfg.model.chat_template) == (str(folder), "chatml")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((folder / "tokenizer_config.json").read_text()).items() if k != "chat_template"}))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    model, tokenizer = load_model(cfg.model, cfg.quantization, tmp_path)
    assert tokenizer.chat_template == CHATML
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_the_chat_template_setting() -> None:
    """null keeps the tokenizer's own; a tokenizer without one gets ChatML; a name or a Jinja
    string replaces it."""
    class Tok:
        chat_template = None

    tok = Tok()
    set_chat_template(tok, None)
    assert tok.chat_template == CHATML
    tok.chat_template = "{{ own }}"
    set_chat_template(tok, None)
    assert tok.chat_template == "{{ own }}"
    set_chat_template(tok, "chatml")
    assert tok.chat_template == CHATML
    set_chat_template(tok, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert tok.chat_template.startswith("{% for m")
    with pytest.raises(ConfigError, match=r"model.chat_template.*null \(the tokenizer's own\), chatml or a Jinja template"):
        compose(["model=tiny", "model.chat_template=zephyr"])


def test_a_tiny_model_of_every_family_is_that_family(tmp_path: Path) -> None:
    from ftlab.models.families import FAMILIES

    for name, fam in FAMILIES.items():
        arch = architecture(OmegaConf.create(_tiny(name)), tmp_path)
        assert arch.model_type == fam.model_type
        assert arch.config.hidden_size == 64 and arch.config.num_hidden_layers == 2
        n = sum(p.numel() for p in arch.skeleton.parameters())
        assert n < 2_000_000, f"{name}: {n} parameters is not tiny"


def test_a_template_that_refuses_a_conversation_names_the_row() -> None:
    """Gemma's template raises on a system message; that is one DataError naming the example and
    the setting that helps, not a Jinja traceback."""
    from ftlab.data.encode import encode_example
    from ftlab.errors import DataError
    from ftlab.models.loading import load_tokenizer
    from ftlab.models.tiny import TINY_TOKENIZER_DIR

    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                               "{% endif %}" + CHATML)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert encode_example(tokenizer, {"messages": chat, "_where": "train.jsonl line 3"}, 64)["input_ids"]
    with pytest.raises(DataError, match=r"train.jsonl line 3: the model's chat template cannot render this conversation "
                                        r"\(System role not supported\); set model.chat_template=chatml"):
        encode_example(tokenizer, {"messages": [{"role": "system", "content": "be brief"}, *chat],
                                   "_where": "train.jsonl line 3"}, 64)
