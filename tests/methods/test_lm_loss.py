"""The default loss projects only labelled positions onto the vocabulary and still equals
transformers' own ``model(**batch).loss``, with the same gradients, on every family."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ftlab.methods.lm_loss import IGNORE_INDEX, causal_lm_loss, keeps_labelled_logits, target_positions
from ftlab.models.families import FAMILIES
from ftlab.models.loading import load_tokenizer
from ftlab.models.tiny import TINY_TOKENIZER_DIR, tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)


def tiny_model(family: str, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config({"family": family}, tokenizer)).float()


def sft_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows whose labels cover only an answer at the end of each, as the data module makes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding
    mask[2, 7:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:12] = ids[0, 6:12]
    labels[1, 5:9] = ids[1, 5:9]
    labels[2, 3:7] = ids[2, 3:7]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model: torch.nn.Module, fn) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_target_positions_by_hand() -> None:
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    keep, targets = target_positions(labels)
    # position t predicts token t+1: row 0 keeps 1 (-> 7) and 2 (-> 8); row 1 keeps 0 (-> 5)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert targets.tolist() == [7, 8, 5]


QUICK = ("llama", "gpt2", "gemma2", "granite", "mixtral")  # plain, Conv1D, soft-capped, scaled, MoE logits


@pytest.mark.parametrize("family", [f if f in QUICK else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FAMILIES)])
def test_equals_transformers_loss_and_gradients(family: str, tokenizer) -> None:
    model = tiny_model(family, tokenizer).train()
    model.config.use_cache = False
    assert keeps_labelled_logits(model), f"{family}: the labelled-logits path is not taken"
    batch = sft_batch(len(tokenizer))
    torch.manual_seed(1)
    reference, ref_grads = loss_and_grads(model, lambda: model(**batch).loss)
    torch.manual_seed(1)  # the same dropout masks
    loss, grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch))
    assert loss == pytest.approx(reference, rel=1e-5)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_a_wrong_position_is_detected(tokenizer) -> None:
    """Control: the comparison above fails when the targets are off by one position."""
    model = tiny_model("llama", tokenizer).eval()
    batch = sft_batch(len(tokenizer))
    keep, targets = target_positions(batch["labels"])
    shifted = torch.roll(keep, 1, dims=1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=shifted).logits
    wrong = float(torch.nn.functional.cross_entropy(logits.float(), targets))
    assert wrong != pytest.approx(float(model(**batch).loss), rel=1e-3)


def test_lora_and_prompt_learning(tokenizer) -> None:
    """LoRA goes through the labelled path; prompt tuning (virtual tokens shift the positions)
    takes transformers' own loss; both equal it."""
    batch = sft_batch(len(tokenizer))
    lora = get_peft_model(tiny_model("llama", tokenizer), LoraConfig(r=4, target_modules="all-linear")).eval()
    assert keeps_labelled_logits(lora)
    assert float(causal_lm_loss(lora, batch)) == pytest.approx(float(lora(**batch).loss), rel=1e-5)
    prompt = get_peft_model(tiny_model("llama", tokenizer), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    assert not keeps_labelled_logits(prompt)
    assert float(causal_lm_loss(prompt, batch)) == pytest.approx(float(prompt(**batch).loss), rel=1e-6)


def test_packed_rows(tokenizer) -> None:
    """Packed batches (no attention mask, position ids restarting per example) give the same loss."""
    model = tiny_model("llama", tokenizer).eval()
    model.config.use_cache = False
    ids = torch.randint(4, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    labels[0, 5] = IGNORE_INDEX  # the first label of the second example
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], list(range(10))])
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "use_cache": False}
    assert float(causal_lm_loss(model, batch)) == pytest.approx(float(model(**batch).loss), rel=1e-5)
