"""GRPO (ftlab.methods.grpo, ftlab.methods.rl) and the reward plugins (ftlab.evaluation.rewards).

(a) The loss on fixed inputs: by hand (advantages, clipped surrogate, k3 KL, each loss_type), and
    against TRL 1.16's ``GRPOTrainer`` (test-only oracle, ``pytest.importorskip("trl")``): TRL
    scores fixed completions (its ``rollout_func`` hook) with a fixed reward function, computes the
    advantages and the reference log-probs itself, and its ``_compute_loss`` gives the loss and the
    gradients ours must match; a wrong sign does not.
(b) The pieces: completion masks stop after the first stop token; the log-probs are those the
    sampler drew from, left padding included; the reference is the base with LoRA off.
(c) The reward plugins: exact/normalized/number/json give 1 or 0, a missing reference is named,
    unknown and broken names are the shared lookup's one-line errors.
(d) Runs on model=tiny: GRPO steps with the ``exact`` reward through a Lightning fit with the data
    module's prompt batches; on a reward a random model can learn, steps raise the expected reward
    (and a negated reward lowers it); validation is reproducible and leaves training's RNG alone;
    QLoRA trains; the held-out mean reward and the rollout samples.

These tests assemble the run themselves (compose, load the base, apply, ``connect(...,
prompts=True)``, ``method.use_data``), as ``ftlab.build`` does for a ``batch_kind = "prompt"``
method, and register the class for the test when it is not installed.
"""

from __future__ import annotations

import json
import math
import os
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

from ftlab.config import compose
from ftlab.errors import ConfigError, DataError, MethodError
from ftlab.evaluation import rewards as rewards_module
from ftlab.evaluation.rewards import (RolloutSamples, base_reward_cached, discover_rewards, get_reward,
                                      registered_reward, sample_rollouts, score_rewards)
from ftlab.methods.grpo import Grpo, group_advantages, grpo_loss
from ftlab.methods.rl import (clipped_surrogate, completion_mask, k3_kl, masked_loss, per_token_logps,
                              sample_completions)
from rl_helpers import (LEARNABLE, check_reward_moves, first_vowel, method_available, moved_on_a_quantized_base,
                        rl_run)

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
TRL_TOL = 1e-5


# -- helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _grpo_registered() -> Iterator[None]:
    with method_available("grpo", Grpo):
        yield


def record(answer: str, prompt: str = "What is 2 + 2?", **extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "_where": "test row 1", **extra}


def grpo_run(cache_dir: Path, *overrides: str, batch_size: int = 4, train: int = 16) -> SimpleNamespace:
    return rl_run(cache_dir, Grpo, *overrides, batch_size=batch_size, train=train)


# -- (a) the loss by hand --------------------------------------------------------------------------------


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.9])
    got = group_advantages(rewards, 4)
    std1 = math.sqrt(((1 - 0.5) ** 2 + 0.5 ** 2 + 0 + 0) / 3)  # sample std (Bessel), as TRL
    std2 = math.sqrt((3 * (0.2 - 0.375) ** 2 + (0.9 - 0.375) ** 2) / 3)
    want = [(r - 0.5) / (std1 + 1e-4) for r in (1.0, 0.0, 0.5, 0.5)] + \
           [(r - 0.375) / (std2 + 1e-4) for r in (0.2, 0.2, 0.2, 0.9)]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx(
        [0.5, -0.5, 0.0, 0.0, -0.175, -0.175, -0.175, 0.525], abs=1e-6)


@pytest.mark.parametrize("scale", [True, False])
def test_advantages_are_zero_for_a_group_with_equal_rewards(scale: bool) -> None:
    got = group_advantages(torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 1.0]), 3, scale=scale)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert got[3:].abs().min() > 0.1  # the other group still has a signal
    assert group_advantages(torch.zeros(8), 4, scale=scale).abs().max() == 0  # all wrong: nothing to learn


def test_clipped_surrogate_by_hand() -> None:
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    logps = torch.log(ratio)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    got = clipped_surrogate(logps, torch.zeros_like(logps), advantages, 0.2, 0.2)
    # -min(r A, clip(r, 0.8, 1.2) A): the clip binds where it makes the objective smaller
    assert got[0].tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8], abs=1e-6)
    got_high = clipped_surrogate(logps, torch.zeros_like(logps), advantages, 0.2, 0.28)  # DAPO's clip-higher
    assert got_high[0].tolist() == pytest.approx([-1.28, -0.5, 1.5, 0.8], abs=1e-6)


def test_k3_kl_by_hand_is_zero_where_policy_and_reference_agree() -> None:
    logps = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.5, -2.5])
    want = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logps.tolist(), ref.tolist())]
    got = k3_kl(logps, ref)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert got[0] == 0 and (got >= 0).all()


FIXED = {
    "logps": torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, -0.7], [-3.0, -0.1, -0.4], [-0.9, -0.9, -0.3]]),
    "ref": torch.tensor([[-1.2, -0.4, -1.0], [-0.2, -1.0, -0.9], [-2.0, -0.3, -0.4], [-1.9, -0.8, -0.6]]),
    "mask": torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]),
    "rewards": torch.tensor([1.0, 0.0, 0.5, 0.5]),  # two groups of two; the second all equal
}


def hand(loss_type: str, beta: float, correction: bool = True, sign: float = 1.0,
         max_len: int = 3) -> tuple[float, list[list[float]]]:
    """The GRPO loss of ``FIXED`` and its gradient with respect to the policy log-probs, in plain
    Python, at ratio 1 (one step per generation batch): per token ``-A + beta * r * KL``, whose
    derivative is ``-A + beta * (1 - exp(ref - logp))``, plus ``beta * KL`` with the bias correction
    (the ratio ``r = exp(logp - old)`` is 1 but differentiable)."""
    r = FIXED["rewards"].tolist()
    std = math.sqrt(((r[0] - 0.5) ** 2 + (r[1] - 0.5) ** 2) / 1)
    adv = [sign * (r[0] - 0.5) / (std + 1e-4), sign * (r[1] - 0.5) / (std + 1e-4), 0.0, 0.0]
    mask = FIXED["mask"].tolist()
    counts = [sum(row) for row in mask]
    weights = {"dapo": lambda i: 1 / sum(counts), "grpo": lambda i: 1 / (len(mask) * counts[i]),
               "dr_grpo": lambda i: 1 / (len(mask) * max_len)}[loss_type]
    loss, grad = 0.0, [[0.0] * 3 for _ in range(4)]
    for i in range(4):
        for t in range(3):
            if mask[i][t]:
                p, q = float(FIXED["logps"][i, t]), float(FIXED["ref"][i, t])
                kl = math.exp(q - p) - (q - p) - 1
                loss += weights(i) * (-adv[i] + beta * kl)
                grad[i][t] = weights(i) * (-adv[i] + beta * (1 - math.exp(q - p) + (kl if correction else 0.0)))
    return loss, grad


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta,correction", [(0.0, True), (0.04, True), (0.04, False)])
def test_grpo_loss_and_its_gradient_by_hand(loss_type: str, beta: float, correction: bool) -> None:
    adv = group_advantages(FIXED["rewards"], 2)
    logps = FIXED["logps"].clone().requires_grad_(True)
    loss, kl = grpo_loss(logps, logps.detach(), adv, FIXED["mask"], ref_logps=FIXED["ref"], beta=beta,
                         loss_type=loss_type, max_completion_length=3, kl_bias_correction=correction)
    loss.backward()
    want_loss, want_grad = hand(loss_type, beta, correction)
    assert float(loss) == pytest.approx(want_loss, abs=TOL)
    assert logps.grad.tolist() == [pytest.approx(row, abs=1e-6) for row in want_grad]
    assert kl is not None and kl.shape == logps.shape
    # control: the wrong sign of the advantages (rewarding the worse answer) gives another gradient
    # (the loss *value* at ratio 1 can be blind to it: with per-sequence means it is -mean(A) = 0)
    _, wrong_grad = hand(loss_type, beta, correction, sign=-1.0)
    assert max(abs(a - b) for ra, rb in zip(want_grad, wrong_grad) for a, b in zip(ra, rb)) > 1e-2


def test_ratio_one_gives_the_policy_gradient() -> None:
    """One step per generation batch: ratio 1, so the gradient is -A grad(logp) / tokens (dapo)."""
    logps = FIXED["logps"].clone().requires_grad_(True)
    adv = group_advantages(FIXED["rewards"], 2)
    loss, _ = grpo_loss(logps, logps.detach(), adv, FIXED["mask"])
    loss.backward()
    want = -adv.unsqueeze(1) * FIXED["mask"] / FIXED["mask"].sum()
    assert torch.allclose(logps.grad, want, atol=1e-6)


def test_masked_loss_refuses_an_unknown_type() -> None:
    with pytest.raises(ConfigError, match=r"method.loss_type='bnpo' is not valid; use one of: dapo, grpo, dr_grpo"):
        masked_loss(torch.zeros(1, 1), torch.ones(1, 1), "bnpo")


# -- (a) against TRL's GRPOTrainer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental
    from transformers import AutoTokenizer

    from ftlab.models.tiny_tokenizer import TOKENIZER_DIR

    return {"tokenizer": AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)), "out": tmp_path_factory.mktemp("trl")}


def tiny_lora(tokenizer: Any, seed: int = 0) -> torch.nn.Module:
    """A one-block random Llama with a fresh LoRA adapter (B = 0: the policy is the base)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = LlamaForCausalLM(config).eval()
        return peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules="all-linear"))


def move_adapter(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the trained ("default") adapter non-zero B, so the policy differs from its reference."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                param.normal_(0.0, 0.3)


G = 3
PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12]]  # same length: no left padding (TRL passes no position ids)
REWARDS = [1.0, 0.0, 0.5, 0.2, 0.2, 0.9]


def completions(eos: int) -> list[list[int]]:
    """Cut at their stop token (TRL's rollout path keeps what it is given); two hit the limit (5)."""
    return [[20, 21, eos], [22, 23, 24, 25, 26], [27, eos], [30, 31, 32, eos], [33, eos], [34, 35, 36, 37, 38]]


CASES = {  # TRL's GRPOConfig fields (ours: the same names, kl_bias_correction for use_bias_correction_kl)
    "dapo": dict(loss_type="dapo", scale_rewards=True, beta=0.04, use_bias_correction_kl=True,
                 mask_truncated_completions=False, clip=False),
    "dapo-beta0-clipped": dict(loss_type="dapo", scale_rewards=True, beta=0.0, use_bias_correction_kl=True,
                               mask_truncated_completions=False, clip=True),
    "dapo-no-kl-correction": dict(loss_type="dapo", scale_rewards=True, beta=0.04, use_bias_correction_kl=False,
                                  mask_truncated_completions=False, clip=False),
    "grpo-clipped": dict(loss_type="grpo", scale_rewards=True, beta=0.04, use_bias_correction_kl=True,
                         mask_truncated_completions=False, clip=True),
    "dr_grpo-unscaled-masked": dict(loss_type="dr_grpo", scale_rewards=False, beta=0.1, use_bias_correction_kl=True,
                                    mask_truncated_completions=True, clip=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_grpo_loss_and_gradients_match_trl(trl_kit: dict[str, Any], case: str) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    settings = dict(CASES[case])
    clip = settings.pop("clip")
    trl_settings = dict(settings)
    tokenizer = trl_kit["tokenizer"]
    eos = tokenizer.eos_token_id
    fixed = completions(eos)
    model = tiny_lora(tokenizer)

    def rollout_func(prompts: list, trainer: Any) -> dict[str, list]:
        return {"prompt_ids": [PROMPTS[i // G] for i in range(len(prompts))], "completion_ids": fixed,
                "logprobs": [[0.0] * len(c) for c in fixed]}

    def fixed_rewards(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return list(REWARDS)

    args = GRPOConfig(output_dir=str(trl_kit["out"]), report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=6, per_device_eval_batch_size=6, num_generations=G,
                      max_completion_length=5, logging_strategy="no", save_strategy="no", **trl_settings)
    trainer = GRPOTrainer(model=model, reward_funcs=fixed_rewards, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}), processing_class=tokenizer,
                          rollout_func=rollout_func)
    move_adapter(model)  # after TRL copied the fresh adapter as its reference: both references are the base
    trainer.model.eval()  # no dropout anywhere; TRL's eval mode normalises by this batch's tokens
    batch = trainer._generate_and_score_completions([{"prompt": "a"}] * G + [{"prompt": "b"}] * G)

    # ours, from the same model, prompts, completions and rewards
    prompt_ids = torch.tensor([PROMPTS[i // G] for i in range(2 * G)])
    prompt_mask = torch.ones_like(prompt_ids)
    width = max(map(len, fixed))
    junk = 99  # what follows a stop token must not count
    completion_ids = torch.tensor([c + [junk] * (width - len(c)) for c in fixed])
    mask, truncated = completion_mask(completion_ids, [eos])
    assert torch.equal(mask, batch["completion_mask"].long()) or settings["mask_truncated_completions"]
    advantages = group_advantages(torch.tensor(REWARDS), G, settings["scale_rewards"])
    assert torch.allclose(advantages, batch["advantages"], atol=1e-6)
    loss_mask = mask * (~truncated).unsqueeze(1) if settings["mask_truncated_completions"] else mask
    with torch.no_grad(), model.disable_adapter():
        ref = per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask)
    if settings["beta"]:
        assert torch.allclose(ref * loss_mask, batch["ref_per_token_logps"] * loss_mask, atol=1e-6)
    if clip:  # pretend the completions came from an older policy: ratios leave [1 - eps, 1 + eps]
        with torch.no_grad():
            old = per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask)
        old = old + torch.linspace(-0.6, 0.6, old.numel()).view_as(old)
        batch["old_per_token_logps"] = old

    def gradients() -> dict[str, torch.Tensor]:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    model.zero_grad(set_to_none=True)
    trl_loss = trainer._compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = gradients()
    assert trl_grads, "TRL's loss gave no gradient"

    logps = per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask)
    old_logps = batch["old_per_token_logps"] if clip else logps.detach()
    correction = settings["use_bias_correction_kl"]
    ours, kl = grpo_loss(logps, old_logps, advantages, loss_mask, ref_logps=ref, beta=settings["beta"],
                         loss_type=settings["loss_type"], max_completion_length=5, kl_bias_correction=correction)
    ours.backward()
    our_grads = gradients()
    assert float(ours.detach()) == pytest.approx(float(trl_loss.detach()), abs=TRL_TOL)
    assert set(our_grads) == set(trl_grads)
    for name, grad in trl_grads.items():
        assert torch.allclose(our_grads[name], grad, atol=1e-6, rtol=1e-4), name
    if settings["beta"]:
        kept = loss_mask.float()
        assert float((kl * kept).sum() / kept.sum()) == pytest.approx(trainer._metrics["eval"]["kl"][-1], abs=1e-6)

    # controls: a wrong sign of the advantages, or another aggregation, gives other gradients
    for wrong_advantages, loss_type in ((-advantages, settings["loss_type"]),
                                        (advantages, "grpo" if settings["loss_type"] != "grpo" else "dapo")):
        logps = per_token_logps(model, prompt_ids, prompt_mask, completion_ids, mask)
        wrong, _ = grpo_loss(logps, old_logps if clip else logps.detach(), wrong_advantages, loss_mask, ref_logps=ref,
                             beta=settings["beta"], loss_type=loss_type, max_completion_length=5,
                             kl_bias_correction=correction)
        wrong.backward()
        wrong_grads = gradients()
        assert any(not torch.allclose(wrong_grads[n], g, atol=1e-6, rtol=1e-4) for n, g in trl_grads.items())


# -- (b) masks, log-probs, the reference -----------------------------------------------------------------


def test_completion_mask_keeps_tokens_up_to_and_including_the_first_stop() -> None:
    ids = torch.tensor([[4, 2, 5, 2], [4, 5, 6, 7], [2, 4, 4, 4], [4, 5, 3, 2]])
    mask, truncated = completion_mask(ids, [2, 3])  # EOS and an end-of-turn token
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert truncated.tolist() == [False, True, False, False]


def test_log_probs_are_those_the_sampler_drew_from_left_padding_included(cache_dir: Path) -> None:
    from transformers import GenerationConfig

    run = grpo_run(cache_dir)
    model, tokenizer = run.model, run.tokenizer
    move_adapter(model, seed=3)
    batch = run.batch
    assert (batch["prompt_attention_mask"] == 0).any(), "the batch needs a left-padded prompt"
    ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, max_new_tokens=5, output_logits=True,
                              return_dict_in_generate=True, eos_token_id=[tokenizer.eos_token_id],
                              pad_token_id=tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=prompt_mask, generation_config=config)
        completion = out.sequences[:, ids.shape[1]:]
        mask, _ = completion_mask(completion, [tokenizer.eos_token_id])
        sampled_from = torch.log_softmax(torch.stack(out.logits, dim=1).float() / 0.7, dim=-1)
        want = sampled_from.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        got = per_token_logps(model, ids, prompt_mask, completion, mask, temperature=0.7)
        assert torch.allclose(got * mask, want * mask, atol=1e-4)


def test_position_ids_follow_the_padding_for_absolute_position_embeddings() -> None:
    """GPT-2 adds a learned embedding per absolute position: a left-padded prompt is scored at the
    positions ``generate`` sampled it at only because ``per_token_logps`` counts them from the mask
    (without them, as TRL 1.16 scores, the padded row gets other numbers; Llama's RoPE does not care)."""
    from transformers import AutoTokenizer, GenerationConfig, GPT2Config, GPT2LMHeadModel

    from ftlab.models.tiny_tokenizer import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                       initializer_range=0.5)).eval()
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad, pad, 5, 6, 7], [8, 9, 10, 11, 12]])
    prompt_mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    config = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=4, output_logits=True,
                              return_dict_in_generate=True, eos_token_id=[tokenizer.eos_token_id], pad_token_id=pad)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=prompt_mask, generation_config=config)
        completion = out.sequences[:, ids.shape[1]:]
        mask, _ = completion_mask(completion, [tokenizer.eos_token_id])
        want = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        got = per_token_logps(model, ids, prompt_mask, completion, mask)
        assert torch.allclose(got * mask, want * mask, atol=1e-5)
        logits = model(input_ids=torch.cat([ids, completion], 1), attention_mask=torch.cat([prompt_mask, mask], 1)).logits
        naive = torch.log_softmax(logits[:, ids.shape[1] - 1:-1].float(), -1).gather(
            -1, completion.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose((naive * mask)[1], (want * mask)[1], atol=1e-5)  # the unpadded row agrees
    assert not torch.allclose((naive * mask)[0], (want * mask)[0], atol=1e-3)  # the padded one does not


def test_the_reference_is_the_base_with_lora_disabled_and_the_kl_starts_at_zero(cache_dir: Path) -> None:
    run = grpo_run(cache_dir, "method.num_generations=2")
    run.model.eval()
    with torch.no_grad():
        first = run.method.validation_metrics(run.model, run.batch)
    assert float(first["kl"]) == 0.0  # LoRA's B starts at 0: the policy is its reference
    move_adapter(run.model)
    with torch.no_grad():
        rollouts = run.method.rollout(run.model, run.batch)
        ref = run.method.reference_logps(run.model, rollouts)
        policy = run.method.policy_logps(run.model, rollouts)
        with run.model.disable_adapter():
            base = per_token_logps(run.model, rollouts.prompt_ids, rollouts.prompt_mask, rollouts.completion_ids,
                                   rollouts.completion_mask)
    assert torch.equal(ref, base) and not torch.allclose(ref, policy)
    assert run.model.training is False and all(not m.training for m in run.model.modules())  # modes restored


# -- (c) reward plugins -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,completion,reference,expected", [
    ("exact", "4", "4", 1.0), ("exact", " 4\n", "4", 1.0), ("exact", "4.", "4", 0.0), ("exact", "four", "4", 0.0),
    ("normalized", "Paris.", "paris", 1.0), ("normalized", "Lyon", "paris", 0.0),
    ("number", "The answer is 183.", "183", 1.0), ("number", "195", "183", 0.0), ("number", "none", "183", 0.0),
    ("json", '{"b": 2, "a": 1}', '{"a":1,"b":2}', 1.0), ("json", '{"a": "1"}', '{"a": 1}', 0.0),
    ("json", "{'a': 1}", '{"a": 1}', 0.0),
])
def test_checker_rewards_give_one_or_zero(name: str, completion: str, reference: str, expected: float) -> None:
    value = get_reward(name)("the prompt", completion, record(reference))
    assert value == expected and isinstance(value, float)


def test_reward_plugins_are_registered_by_entry_point() -> None:
    eps = {ep.name: ep.value for ep in metadata.entry_points(group=rewards_module.ENTRY_POINT_GROUP)
           if ep.value.startswith("ftlab.")}  # ftlab's own; other installed plugins may add more
    assert eps == {"exact": "ftlab.evaluation.rewards:exact", "normalized": "ftlab.evaluation.rewards:normalized",
                   "number": "ftlab.evaluation.rewards:number", "json": "ftlab.evaluation.rewards:json_equal"}
    assert {"exact", "json", "normalized", "number"} <= set(discover_rewards().found)


def test_a_checker_reward_without_a_reference_names_the_example() -> None:
    prompt_only = {"messages": [{"role": "user", "content": "hi"}], "_where": "data.jsonl line 7"}
    with pytest.raises(DataError, match=r"^data.jsonl line 7: reward 'exact' compares the answer with the reference"):
        get_reward("exact")("hi", "hello", prompt_only)


def test_unknown_reward_lists_the_installed_ones() -> None:
    with pytest.raises(ConfigError, match=r"^method.reward: unknown reward 'exakt'\. Installed rewards: exact, (.*, )?"
                                          r"json, (.*, )?normalized, (.*, )?number"):
        get_reward("exakt", "method.reward")
    with pytest.raises(ConfigError, match=r"^method.reward: unknown reward 'exakt'\. Installed rewards: exact"):
        compose(["model=tiny", "method=grpo", "method.reward=exakt"])  # refused when the config is composed


def test_broken_reward_plugin_is_named_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    group = rewards_module.ENTRY_POINT_GROUP
    found = discover_rewards([
        metadata.EntryPoint("exact", "ftlab.evaluation.rewards:exact", group),
        metadata.EntryPoint("unit_tests", "ftlab_no_such_plugin.rewards:passes", group),
        metadata.EntryPoint("constant", "ftlab.evaluation.rewards:ENTRY_POINT_GROUP", group),
    ])
    assert set(found.found) == {"exact"}
    assert "ModuleNotFoundError" in found.broken["unit_tests"]
    assert found.broken["constant"] == "ftlab.evaluation.rewards:ENTRY_POINT_GROUP: not callable (got str 'ftlab.rewards')"
    monkeypatch.setattr(rewards_module, "discover_rewards", lambda: found)
    with pytest.raises(ConfigError, match=r"^method.reward: reward 'unit_tests' is installed but could not be loaded: "
                                          r"ftlab_no_such_plugin.rewards:passes: ModuleNotFoundError"):
        compose(["model=tiny", "method=grpo", "method.reward=unit_tests"])
    with pytest.raises(ConfigError, match=r"^unknown reward 'nope'\. Installed rewards: exact\. Broken plugins: "
                                          r"constant \(.*\); unit_tests \(.*ModuleNotFoundError"):
        get_reward("nope")


def test_a_reward_that_returns_no_number_is_a_method_error(cache_dir: Path) -> None:
    run = grpo_run(cache_dir, "method.num_generations=2")
    run.method.reward_fn = lambda prompt, completion, record: "yes"
    run.model.train()
    with pytest.raises(MethodError, match=r"reward '<lambda>' returned 'yes' for synthetic instructions train row \d+: "
                                          r"a reward is one finite number"):
        run.method.loss(run.model, run.batch)


@pytest.mark.parametrize("overrides,message", [
    (["method.num_generations=1"], r"method.num_generations=1: expected an integer >= 2"),
    (["method.loss_type=bnpo"], r"method.loss_type=bnpo: expected one of: dapo \| grpo \| dr_grpo"),
    (["method.top_p=0"], r"method.top_p=0: expected a number in \(0, 1\]"),
    (["method.temperature=0"], r"method.temperature=0: expected a number > 0"),
    (["method.beta=-0.1"], r"method.beta=-0.1: expected a number >= 0"),
    (["task=classification", "data=topics"], r"method .grpo. cannot train task=classification; it trains task=causal_lm"),
    (["method.epsilon_high=0"], r"method.epsilon_high=0: expected a number > 0 or null"),
])
def test_bad_settings_are_refused_when_the_config_is_composed(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(["model=tiny", "method=grpo", *overrides])


# -- (d) runs on model=tiny -------------------------------------------------------------------------------


def test_a_grpo_step_samples_groups_scores_them_and_logs_its_metrics(cache_dir: Path) -> None:
    run = grpo_run(cache_dir, "method.num_generations=3", batch_size=2)
    logged: dict[str, float] = {}
    run.method._log_sink = lambda name, value: logged.__setitem__(name, value)
    run.model.train()
    loss = run.method.loss(run.model, run.batch)
    rollouts = run.method.last_rollouts
    assert rollouts.completion_ids.shape[0] == 6 and rollouts.group_size == 3
    for row in range(6):  # rows are grouped by prompt, each row's record is its prompt's example
        split, index = int(run.batch["split"][row // 3]), int(run.batch["index"][row // 3])
        assert rollouts.records[row] is run.data.prompt_record(split, index)
        assert torch.equal(rollouts.prompt_ids[row], run.batch["prompt_input_ids"][row // 3])
    exact = get_reward("exact")
    assert rollouts.rewards.tolist() == [exact(p, c, r) for p, c, r in
                                         zip(rollouts.prompts, rollouts.completions, rollouts.records)]
    assert set(run.method.metrics) <= set(logged) and torch.isfinite(loss)
    assert logged["completion_length"] == pytest.approx(float(rollouts.completion_mask.sum(-1).float().mean()))
    assert logged["reward/mean"] == pytest.approx(float(rollouts.rewards.mean()))
    assert run.model.training  # generation ran in eval mode and put the modes back


def test_grpo_trains_end_to_end_in_a_lightning_fit_with_prompt_batches(cache_dir: Path, tmp_path: Path) -> None:
    import csv

    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from ftlab.module import FineTuneModule

    run = grpo_run(cache_dir, "method.num_generations=2", "method.lr=1e-2", batch_size=2)
    samples = RolloutSamples(run.data.val_records, run.tokenizer, "exact", num_prompts=2, num_generations=2,
                             max_new_tokens=4, out_file=tmp_path / "samples.jsonl")
    module = FineTuneModule(run.model, run.method,
                            optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.0))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, val_check_interval=3, limit_val_batches=1,
                         logger=CSVLogger(tmp_path, name="csv", version=0), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[samples], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=run.data)
    assert trainer.global_step == 3
    assert set(run.method.metrics) <= set(module.method_metrics)
    assert module.method_metrics["reward/mean"] == 0.0  # a random model never gives the exact answer
    assert {"loss", "reward/mean", "reward/std", "kl", "completion_length"} <= set(module.validation_names)
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("method/reward/mean")) == 3  # one per step
    assert any(r.get("val/reward/mean") for r in rows)
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {r["step"] for r in lines} == {3}
    assert set(lines[0]) == {"step", "prompt", "reference", "completion", "reward", "generation"}


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_steps_raise_the_expected_reward_and_a_negated_reward_lowers_it(cache_dir: Path, sign: float) -> None:
    check_reward_moves(grpo_run(cache_dir, *LEARNABLE), sign)


def test_the_validation_reward_rises_too(cache_dir: Path) -> None:
    """The method's own seeded validation rollouts (``val/reward/mean``) see the same learning, with
    the reward named in the config (``registered_reward``: as an entry point would register it)."""
    with registered_reward("test_first_vowel", first_vowel):
        run = grpo_run(cache_dir, *LEARNABLE[1:], "method.max_new_tokens=3", "method.reward=test_first_vowel")
        assert run.method.reward_fn is first_vowel
    with pytest.raises(ConfigError, match=r"unknown reward 'test_first_vowel'"):  # gone again
        get_reward("test_first_vowel")
    with pytest.raises(ConfigError, match=r"^reward 'exact' is installed already$"):
        with registered_reward("exact", first_vowel):
            pass
    optimizer = torch.optim.AdamW(run.method.parameter_groups(run.model, 1e-2), lr=1e-2, weight_decay=0.0)

    def validation_reward() -> float:
        run.model.eval()
        with torch.no_grad():
            return float(run.method.validation_metrics(run.model, run.batch)["reward/mean"])

    before = validation_reward()
    for _ in range(12):
        run.model.train()
        loss = run.method.loss(run.model, run.batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert validation_reward() > before + 0.3


def test_validation_rollouts_are_reproducible_and_leave_the_training_rng_alone(cache_dir: Path) -> None:
    run = grpo_run(cache_dir, "method.num_generations=2")
    run.model.eval()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with torch.no_grad():
        first = run.method.validation_metrics(run.model, run.batch)
        second = run.method.validation_metrics(run.model, run.batch)
        loss = run.method.loss(run.model, run.batch)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert {k: float(v) for k, v in first.items()} == {k: float(v) for k, v in second.items()}
    assert float(loss) == float(first["loss"])  # the contract's rule: the eval-mode loss is val/loss
    run.model.train()  # training rollouts draw from the global RNG: two steps sample differently
    torch.manual_seed(0)
    a = run.method.rollout(run.model, run.batch).completion_ids
    b = run.method.rollout(run.model, run.batch).completion_ids
    assert not torch.equal(a, b)


def test_a_qlora_base_trains(cache_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    run = grpo_run(cache_dir, *LEARNABLE[:3], "quantization=nf4", "quantization.bnb_4bit_compute_dtype=float32")
    moved_on_a_quantized_base(run)


def test_a_method_without_its_data_says_what_to_call(cache_dir: Path) -> None:
    run = grpo_run(cache_dir, "method.num_generations=2")
    fresh = Grpo(run.method.config)
    with pytest.raises(MethodError, match=r"call method.use_data\(tokenizer, datamodule.train_records"):
        fresh.loss(run.model, run.batch)
    with pytest.raises(MethodError, match=r"it trains on prompt batches \(batch_kind='prompt'"):
        run.method.loss(run.model, {"input_ids": run.batch["prompt_input_ids"]})


# -- the held-out mean reward and rollout samples ---------------------------------------------------------


def test_mean_reward_of_greedy_answers_and_its_base_cache(cache_dir: Path, tmp_path: Path) -> None:
    from ftlab.evaluation.generation import generate

    run = grpo_run(cache_dir)
    records = run.data.val_records[:4]
    score = score_rewards(run.model, run.tokenizer, records, first_vowel, max_new_tokens=3, num_samples=2)
    answers = generate(run.model, run.tokenizer, records, 3)
    assert score.mean == pytest.approx(sum(first_vowel("", a, r) for a, r in zip(answers, records)) / 4)
    assert score.total == 4 and score.reward == "first_vowel" and len(score.samples) == 2
    exact = score_rewards(run.model, run.tokenizer, records, "exact")
    assert exact.mean == 0.0 and exact.reward == "exact"
    calls = []

    def compute():
        calls.append(1)
        return score

    key = {"model": "tiny", "records": 4, "reward": "first_vowel"}
    first, hit = base_reward_cached(tmp_path, key, compute)
    again, hit_again = base_reward_cached(tmp_path, key, compute)
    assert (hit, hit_again, len(calls)) == (False, True, 1) and again == first


def test_sampled_rollouts_are_reproducible_and_leave_the_rng_alone(cache_dir: Path) -> None:
    run = grpo_run(cache_dir)
    records = run.data.val_records[:2]
    state = torch.random.get_rng_state()
    rows = sample_rollouts(run.model, run.tokenizer, records, "exact", num_generations=3, max_new_tokens=4, seed=5,
                           step=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert rows == sample_rollouts(run.model, run.tokenizer, records, "exact", num_generations=3, max_new_tokens=4,
                                   seed=5, step=7)
    assert len(rows) == 6 and [r["generation"] for r in rows] == [0, 1, 2, 0, 1, 2]
    assert all(r["step"] == 7 and r["reward"] == 0.0 and r["reference"] for r in rows)
    assert len({r["completion"] for r in rows}) > 1  # sampled, not greedy


def test_sample_completions_groups_rows_by_prompt(cache_dir: Path) -> None:
    run = grpo_run(cache_dir)
    ids, mask = run.batch["prompt_input_ids"], run.batch["prompt_attention_mask"]
    eos = run.tokenizer.eos_token_id
    greedy = sample_completions(run.model, ids, mask, num_generations=2, max_new_tokens=3, stop_ids=[eos],
                                pad_id=eos, greedy=True)
    assert greedy.shape[0] == 2 * ids.shape[0]
    assert torch.equal(greedy[0::2], greedy[1::2])  # greedy: both of a group are the same answer
