"""The preference losses (``ftlab.methods.preference_losses``) against three references.

(a) By hand: each loss on a fixed small batch, against the paper's formula written out again here
    with ``math`` on Python floats (not with the function under test, and not with torch), in
    float64, to ``HAND_TOL``.
(b) Against TRL 1.16's own trainers (test-only dependency, ``pytest.importorskip("trl")``): a tiny
    random-init Llama (``LlamaConfig``, the shipped tiny tokenizer, no hub), a 2-pair (KTO: 4
    example) dataset, the trainer built as a user would and its loss called on one batch from its
    own dataloader; our side recomputes the log-probs of that same batch from the same models'
    logits with ``sequence_logps`` and feeds them to our loss, to ``TRL_TOL`` (float32; both sides
    score the same tokens, TRL through its fused LM head, we through the full logits).
    - DPO sigmoid / hinge / ipo / robust: ``trl.DPOTrainer._compute_loss`` (plus its logged rewards).
    - KTO: ``trl.KTOTrainer._compute_loss`` (KL term from the batch's mismatched ``KL_*`` pairs).
    - Bradley-Terry: ``trl.RewardTrainer.compute_loss`` on ``LlamaForSequenceClassification``,
      with and without per-pair margins.
    - SimPO: ``trl.experimental.cpo.CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``.
    - ORPO: ``trl.experimental.orpo.ORPOTrainer.compute_loss`` (plus its logged mean log-odds).
    Not in TRL 1.16: cDPO label smoothing on the sigmoid loss (TRL's sigmoid ignores
    ``label_smoothing`` now); checked by hand only.
(c) Controls: a deliberately wrong variant (sign flip, missing beta, summed instead of averaged
    log-probs, gamma not divided by beta, ...) fails the very comparison the right one passes.
(d) ``sequence_logps`` against a naive per-token loop over Python floats.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

from ftlab.errors import ConfigError
from ftlab.methods.preference_losses import (
    AVERAGED_LOGPS_LOSS_TYPES,
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
    token_counts,
)

HAND_TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64 torch vs the same formula on Python floats
TRL_TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32, TRL's fused LM head vs our log-softmax of full logits


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def assert_matches(actual: torch.Tensor, expected: Any, tol: dict[str, float] = HAND_TOL) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected.expand_as(actual), **tol)


def assert_fails(actual: torch.Tensor, expected: Any, tol: dict[str, float] = HAND_TOL) -> None:
    """Control: the same comparison must reject a wrong value."""
    with pytest.raises(AssertionError):
        assert_matches(actual, expected, tol)


# Python-float helpers for the hand computations
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsigmoid(x: float) -> float:
    return math.log(sigmoid(x))


# ---------------------------------------------------------------------------------------------
# (a) by hand, with (c) controls

# A fixed batch of 4 pairs. h = (pc - rc) - (pr - rr) = 1.3, -1.3, 0.1, 4.0 (beta*h = 2 makes the hinge 0).
PC = [-4.0, -7.5, -2.0, -1.0]  # policy, chosen
PR = [-5.0, -6.0, -3.0, -6.0]  # policy, rejected
RC = [-4.5, -7.0, -2.2, -3.0]  # reference, chosen
RR = [-4.2, -6.8, -3.1, -4.0]  # reference, rejected
BETA = 0.5


def hand_dpo(loss_type: str, beta: float, eps: float) -> list[float]:
    out = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":  # DPO Eq. 7 with cDPO smoothing
            out.append(-(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h))
        elif loss_type == "ipo":  # IPO Eq. 17
            out.append((h - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":  # SLiC
            out.append(max(0.0, 1 - beta * h))
        elif loss_type == "robust":  # rDPO (Chowdhury et al. 2024)
            out.append((-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps))
    return out


DPO_CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.2)]


def test_hand_values_are_what_the_formulas_give() -> None:
    # one value per loss written out to the last step, so the helpers above are checked too
    assert hand_dpo("sigmoid", 0.5, 0.0)[0] == pytest.approx(math.log(1 + math.exp(-0.65)), rel=1e-12)
    assert hand_dpo("ipo", 0.5, 0.0)[1] == pytest.approx((-1.3 - 1.0) ** 2, rel=1e-12)
    assert hand_dpo("hinge", 0.5, 0.0) == pytest.approx([0.35, 1.65, 0.95, 0.0], rel=1e-12)
    assert hand_dpo("robust", 0.5, 0.2)[0] == pytest.approx(
        (0.8 * math.log(1 + math.exp(-0.65)) - 0.2 * math.log(1 + math.exp(0.65))) / 0.6, rel=1e-12
    )


@pytest.mark.parametrize("loss_type,eps", DPO_CASES)
def test_dpo_loss_by_hand(loss_type: str, eps: float) -> None:
    losses, chosen_rewards, rejected_rewards = dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), BETA, loss_type, eps)
    assert losses.shape == (4,)
    assert_matches(losses, hand_dpo(loss_type, BETA, eps))
    assert_matches(chosen_rewards, [BETA * (pc - rc) for pc, rc in zip(PC, RC)])
    assert_matches(rejected_rewards, [BETA * (pr - rr) for pr, rr in zip(PR, RR)])
    # (c) controls: chosen and rejected swapped (a sign flip of h), and beta left out
    swapped, _, _ = dpo_loss(f64(PR), f64(PC), f64(RR), f64(RC), BETA, loss_type, eps)
    assert_fails(swapped, hand_dpo(loss_type, BETA, eps))
    assert_fails(losses, hand_dpo(loss_type, 1.0, eps))


def test_dpo_rewards_are_detached_and_losses_carry_gradient() -> None:
    pc = f64(PC).requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, f64(PR), f64(RC), f64(RR), BETA)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    # d/dpc of -logsigmoid(beta*h) is -beta * sigmoid(-beta*h)
    assert_matches(pc.grad, [-BETA * sigmoid(-BETA * ((a - c) - (b - d))) for a, b, c, d in zip(PC, PR, RC, RR)])


def test_cdpo_smoothing_at_zero_is_plain_dpo_and_robust_differs() -> None:
    plain, _, _ = dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), BETA, "sigmoid", 0.0)
    robust0, _, _ = dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), BETA, "robust", 0.0)
    assert_matches(robust0, plain)
    smoothed, _, _ = dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), BETA, "sigmoid", 0.2)
    robust, _, _ = dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), BETA, "robust", 0.2)
    assert_fails(robust, smoothed)


# SimPO: length-averaged log-probs
AC = [-0.8, -1.5, -0.3, -2.0]
AR = [-1.2, -1.0, -0.9, -0.5]


def hand_simpo(beta: float, ratio: float, eps: float) -> list[float]:
    out = []
    for c, r in zip(AC, AR):
        margin = beta * c - beta * r - beta * ratio  # beta*(avg_c - avg_r) - gamma, gamma = ratio*beta
        out.append(-(1 - eps) * logsigmoid(margin) - eps * logsigmoid(-margin))
    return out


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_loss_by_hand(eps: float) -> None:
    losses, chosen_rewards, rejected_rewards = simpo_loss(f64(AC), f64(AR), 2.0, 0.25, eps)
    assert_matches(losses, hand_simpo(2.0, 0.25, eps))
    assert_matches(chosen_rewards, [2.0 * c for c in AC])
    assert_matches(rejected_rewards, [2.0 * r for r in AR])
    # (c) gamma itself passed where gamma/beta belongs, and the margin dropped
    wrong, _, _ = simpo_loss(f64(AC), f64(AR), 2.0, 0.25 * 2.0, eps)
    assert_fails(wrong, hand_simpo(2.0, 0.25, eps))
    no_margin, _, _ = simpo_loss(f64(AC), f64(AR), 2.0, 0.0, eps)
    assert_fails(no_margin, hand_simpo(2.0, 0.25, eps))


# ORPO: average log-probs on both sides of -log 2, where the stable log1mexp switches branch
OC = [-0.1, -1.5, -0.3, -2.5]
OR = [-0.9, -0.05, -2.0, -3.0]


def hand_log_odds(c: float, r: float) -> float:
    pc, pr = math.exp(c), math.exp(r)
    return math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))


@pytest.mark.parametrize("nll", [1.7, [1.2, 2.0, 0.4, 3.1]], ids=["scalar_nll", "per_sequence_nll"])
def test_orpo_loss_by_hand(nll: float | list[float]) -> None:
    beta = 0.3
    nlls = nll if isinstance(nll, list) else [nll] * 4
    losses, log_odds = orpo_loss(f64(OC), f64(OR), f64(nll) if isinstance(nll, list) else nll, beta)
    assert losses.dtype == torch.float64
    assert_matches(log_odds, [hand_log_odds(c, r) for c, r in zip(OC, OR)])
    expected = [n - beta * logsigmoid(hand_log_odds(c, r)) for n, c, r in zip(nlls, OC, OR)]
    assert_matches(losses, expected)
    # (c) the odds-ratio term with the wrong sign, and the plain likelihood ratio in place of the odds ratio
    assert_fails(losses, [n - beta * logsigmoid(-hand_log_odds(c, r)) for n, c, r in zip(nlls, OC, OR)])
    assert_fails(losses, [n - beta * logsigmoid(c - r) for n, c, r in zip(nlls, OC, OR)])


def test_orpo_log_odds_stay_accurate_in_float32_near_zero() -> None:
    """At an average log-prob of -1e-6, log(1 - exp(a)) cancels catastrophically in float32 when
    computed naively; the stable form keeps the log-odds to float32 precision."""
    c, r = -1e-6, -2.0
    exact = (c - r) - (math.log(-math.expm1(c)) - math.log1p(-math.exp(r)))  # float64 reference
    _, log_odds = orpo_loss(torch.tensor([c]), torch.tensor([r]), 0.0, 0.1)
    assert log_odds.dtype == torch.float32
    assert_matches(log_odds, [exact], {"rtol": 1e-6, "atol": 1e-6})
    # (c) the naive float32 formula misses by far more
    a_c, a_r = torch.tensor([c]), torch.tensor([r])
    naive = (a_c - a_r) - (torch.log(1 - torch.exp(a_c)) - torch.log(1 - torch.exp(a_r)))
    assert_fails(naive, [exact], {"rtol": 1e-6, "atol": 1e-6})


def test_orpo_upcasts_half_precision() -> None:
    _, log_odds = orpo_loss(f64(OC).bfloat16(), f64(OR).bfloat16(), 1.0, 0.1)
    assert log_odds.dtype == torch.float32


# KTO
KP = [-3.0, -5.0, -2.0, -6.0]  # policy log-probs
KR = [-3.4, -4.5, -2.5, -5.0]  # reference log-probs
DESIRABLE = [True, False, True, False]


def hand_kto(beta: float, kl: float, wd: float, wu: float) -> list[float]:
    out = []
    for p, r, good in zip(KP, KR, DESIRABLE):
        if good:
            out.append(wd * (1 - sigmoid(beta * ((p - r) - kl))))
        else:
            out.append(wu * (1 - sigmoid(beta * (kl - (p - r)))))
    return out


def test_kto_loss_by_hand() -> None:
    desirable = torch.tensor(DESIRABLE)
    losses, rewards = kto_loss(f64(KP), f64(KR), desirable, torch.tensor(0.15, dtype=torch.float64), 0.5, 1.0, 1.5)
    assert_matches(losses, hand_kto(0.5, 0.15, 1.0, 1.5))
    assert_matches(rewards, [0.5 * (p - r) for p, r in zip(KP, KR)])
    # (c) labels inverted, the weights swapped, and the KL reference point left out
    inverted, _ = kto_loss(f64(KP), f64(KR), ~desirable, 0.15, 0.5, 1.0, 1.5)
    assert_fails(inverted, hand_kto(0.5, 0.15, 1.0, 1.5))
    swapped, _ = kto_loss(f64(KP), f64(KR), desirable, 0.15, 0.5, 1.5, 1.0)
    assert_fails(swapped, hand_kto(0.5, 0.15, 1.0, 1.5))
    no_kl, _ = kto_loss(f64(KP), f64(KR), desirable, 0.0, 0.5, 1.0, 1.5)
    assert_fails(no_kl, hand_kto(0.5, 0.15, 1.0, 1.5))


def test_kto_kl_is_detached_batch_mean_clamped_at_zero() -> None:
    policy = f64([-3.0, -4.0]).requires_grad_()
    kl = kto_kl_estimate(policy, f64([-3.5, -3.9]))
    assert kl.dim() == 0 and not kl.requires_grad
    assert_matches(kl, (0.5 + -0.1) / 2)
    assert_matches(kto_kl_estimate(f64([-3.0, -4.0]), f64([-2.0, -3.9])), 0.0)  # mean -0.55 -> 0
    # a KL tensor that still carries gradient is detached inside the loss
    losses, _ = kto_loss(f64(KP), f64(KR), torch.tensor(DESIRABLE), (policy - 1).mean(), 0.5)
    assert not losses.requires_grad


# Bradley-Terry
SC = [1.0, -0.5, 2.0]
SR = [0.5, 0.3, -1.0]
MARGIN = [0.2, 0.0, 1.0]


def test_bradley_terry_loss_by_hand() -> None:
    assert_matches(bradley_terry_loss(f64(SC), f64(SR)), [-logsigmoid(c - r) for c, r in zip(SC, SR)])
    with_margin = bradley_terry_loss(f64(SC), f64(SR), f64(MARGIN))
    assert_matches(with_margin, [-logsigmoid(c - r - m) for c, r, m in zip(SC, SR, MARGIN)])
    # (c) margin added instead of subtracted, and chosen/rejected swapped
    assert_fails(with_margin, [-logsigmoid(c - r + m) for c, r, m in zip(SC, SR, MARGIN)])
    assert_fails(bradley_terry_loss(f64(SR), f64(SC)), [-logsigmoid(c - r) for c, r in zip(SC, SR)])


# ---------------------------------------------------------------------------------------------
# argument checks


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), 0.1, "sigmoidd"), "method.loss_type"),
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), 0.0), "method.beta"),
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), -0.1), "method.beta"),
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), float("nan")), "method.beta"),
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), "0.1"), "method.beta"),  # type: ignore[arg-type]
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), 0.1, "sigmoid", 0.5), "method.label_smoothing"),
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), 0.1, "robust", -0.1), "method.label_smoothing"),
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), 0.1, "robust", 0.5), "method.label_smoothing"),
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), 0.1, "ipo", 0.1), "method.label_smoothing"),
        (lambda: dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), 0.1, "hinge", 0.1), "method.label_smoothing"),
        (lambda: simpo_loss(f64(AC), f64(AR), 0.0, 0.5), "method.beta"),
        (lambda: simpo_loss(f64(AC), f64(AR), 2.0, -0.5), "method.gamma_beta_ratio"),
        (lambda: simpo_loss(f64(AC), f64(AR), 2.0, 0.5, 0.7), "method.label_smoothing"),
        (lambda: orpo_loss(f64(OC), f64(OR), 1.0, 0.0), "method.beta"),
        (lambda: kto_loss(f64(KP), f64(KR), torch.tensor(DESIRABLE), 0.0, -1.0), "method.beta"),
        (lambda: kto_loss(f64(KP), f64(KR), torch.tensor(DESIRABLE), 0.0, 0.1, 0.0), "method.desirable_weight"),
        (lambda: kto_loss(f64(KP), f64(KR), torch.tensor(DESIRABLE), 0.0, 0.1, 1.0, -1), "method.undesirable_weight"),
    ],
)
def test_bad_hyperparameters_raise_config_error_naming_the_field(call: Callable[[], Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        call()


def test_unknown_loss_type_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        dpo_loss(f64(PC), f64(PR), f64(RC), f64(RR), 0.1, "kto")
    for valid in DPO_LOSS_TYPES:
        assert valid in str(info.value)
    assert AVERAGED_LOGPS_LOSS_TYPES <= set(DPO_LOSS_TYPES)


def test_kto_desirable_must_be_a_bool_mask_of_the_batch() -> None:
    with pytest.raises(ValueError, match="bool"):
        kto_loss(f64(KP), f64(KR), torch.tensor([1, 0, 1, 0]), 0.0, 0.1)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(f64(KP), f64(KR), torch.tensor([True, False]), 0.0, 0.1)


# ---------------------------------------------------------------------------------------------
# (d) sequence_logps against a naive loop


def naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> list[float]:
    """Token by token on Python floats: softmax of the previous position, log of the label's entry."""
    out = []
    for b in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(1, labels.shape[1]):
            label = int(labels[b, t])
            if label == -100:
                continue
            row = [float(x) for x in logits[b, t - 1]]
            total += math.log(math.exp(row[label]) / sum(math.exp(x) for x in row))
            count += 1
        out.append(total / max(count, 1) if average else total)
    return out


def fixed_logits_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 7, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (3, 6), generator=gen)
    labels[0, :2] = -100  # a prompt
    labels[1, 4:] = -100  # padding
    labels[1, 0] = -100
    labels[2, :] = -100  # nothing scored at all
    labels[2, 0] = 3  # position 0 is never scored (nothing predicts it)
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_a_naive_loop(average: bool) -> None:
    logits, labels = fixed_logits_and_labels()
    ours = sequence_logps(logits, labels, average=average)
    assert ours.shape == (3,) and ours.dtype == torch.float64
    assert_matches(ours, naive_sequence_logps(logits, labels, average))
    assert token_counts(labels).tolist() == [4, 3, 0]
    assert ours[2].item() == 0.0
    # (c) without the causal shift (logits[:, t] scoring labels[:, t]) the same comparison fails
    safe = labels.clamp(min=0)
    unshifted = (torch.log_softmax(logits, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * (labels != -100)).sum(-1)
    if average:
        unshifted = unshifted / (labels != -100).sum(-1).clamp(min=1)
    assert_fails(unshifted, naive_sequence_logps(logits, labels, average))


def test_sequence_logps_on_a_three_token_vocabulary() -> None:
    logits = f64([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]).unsqueeze(0)  # [1, 3, 3]
    labels = torch.tensor([[-100, 2, 0]])
    expected = (2 - math.log(1 + math.e + math.e**2)) + (1 - math.log(3 * math.e))
    assert_matches(sequence_logps(logits, labels), [expected])
    assert_matches(sequence_logps(logits, labels, average=True), [expected / 2])


def test_sequence_logps_ignores_unscored_positions_and_gives_them_no_gradient() -> None:
    logits, labels = fixed_logits_and_labels()
    logits = logits.clone().requires_grad_()
    sequence_logps(logits, labels).sum().backward()
    scored_from = torch.zeros_like(labels, dtype=torch.bool)
    scored_from[:, :-1] = labels[:, 1:] != -100  # position t-1 predicts label t
    grad_norms = logits.grad.abs().sum(-1)
    assert (grad_norms[~scored_from] == 0).all()
    assert (grad_norms[scored_from] > 0).all()


def test_sequence_logps_half_precision_logits_give_float32() -> None:
    logits, labels = fixed_logits_and_labels()
    half = logits.bfloat16()
    ours = sequence_logps(half, labels)
    assert ours.dtype == torch.float32
    assert_matches(ours, naive_sequence_logps(half.double(), labels, False), {"rtol": 1e-5, "atol": 1e-5})


def test_sequence_logps_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# (b) against TRL's own trainers on a tiny random Llama


@pytest.fixture(scope="module")
def trl_kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """TRL, a tokenizer and a factory of tiny random models, all offline."""
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer, LlamaConfig

    from ftlab.models.tiny_tokenizer import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))

    def make_model(seed: int, cls: type | None = None, **extra: Any) -> torch.nn.Module:
        from transformers import LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **extra,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return (cls or LlamaForCausalLM)(config).eval()

    common = {"report_to": [], "use_cpu": True, "bf16": False, "dataloader_num_workers": 0,
              "save_strategy": "no", "logging_strategy": "no",
              "output_dir": str(tmp_path_factory.mktemp("trl"))}
    return {"trl": trl, "tokenizer": tokenizer, "model": make_model, "args": common}


PAIRS = {
    "prompt": ["2+2=", "Name a colour:"],
    "chosen": [" 4", " blue, like the sky"],  # lengths differ within and across pairs (IPO averages)
    "rejected": [" five or so", " 7"],
}


def first_batch(trainer: Any) -> dict[str, Any]:
    return next(iter(trainer.get_train_dataloader()))


def logps_of(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             average: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels, average)


def logged(trainer: Any, key: str) -> float:
    mode = "train" if trainer.model.training else "eval"
    return trainer._metrics[mode][key][-1]


@pytest.fixture(scope="module")
def dpo_run(trl_kit: dict[str, Any]) -> Callable[[str, float, float], dict[str, Any]]:
    """Build TRL's DPOTrainer for one loss type and run its loss on its first batch; also return
    our log-probs of that batch (summed, and per-token averaged) from the same two models."""
    from datasets import Dataset

    from trl import DPOConfig, DPOTrainer

    def run(loss_type: str, beta: float, label_smoothing: float) -> dict[str, Any]:
        policy, ref = trl_kit["model"](0), trl_kit["model"](1)
        args = DPOConfig(per_device_train_batch_size=2, beta=beta, loss_type=[loss_type],
                         label_smoothing=label_smoothing, **trl_kit["args"])
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_dict(PAIRS),
                             processing_class=trl_kit["tokenizer"])
        batch = first_batch(trainer)
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # TRL's own labels
        ours = {}
        for average in (False, True):
            pol = logps_of(policy, batch["input_ids"], batch["attention_mask"], labels, average)
            rf = logps_of(ref, batch["input_ids"], batch["attention_mask"], labels, average)
            ours[average] = (*pol.chunk(2), *rf.chunk(2))  # TRL's batch is [chosen..., rejected...]
        return {"loss": trl_loss, "logps": ours, "trainer": trainer}

    return run


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)])
def test_dpo_loss_matches_trl(dpo_run: Callable[..., dict[str, Any]], loss_type: str, eps: float) -> None:
    beta = 0.5
    out = dpo_run(loss_type, beta, eps)
    average = loss_type in AVERAGED_LOGPS_LOSS_TYPES  # IPO: per-token averaged log-probs, as TRL
    pc, pr, rc, rr = out["logps"][average]
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    assert_matches(losses.mean(), out["loss"], TRL_TOL)
    # TRL logs beta * (summed policy - ref) log-ratios as rewards (for IPO too)
    spc, spr, src, srr = out["logps"][False]
    _, sum_chosen_rewards, sum_rejected_rewards = dpo_loss(spc, spr, src, srr, beta)
    assert_matches(sum_chosen_rewards.mean(), logged(out["trainer"], "rewards/chosen"), TRL_TOL)
    assert_matches(sum_rejected_rewards.mean(), logged(out["trainer"], "rewards/rejected"), TRL_TOL)
    if not average:
        assert_matches(chosen_rewards, sum_chosen_rewards, TRL_TOL)
    # the policy and reference really differ: the comparison is not between two log(2)s
    assert (chosen_rewards - rejected_rewards).abs().min() > 1e-3
    # (c) controls: chosen/rejected swapped, beta left out, and for IPO the summed log-probs
    swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta, loss_type, eps)
    assert_fails(swapped.mean(), out["loss"], TRL_TOL)
    no_beta, _, _ = dpo_loss(pc, pr, rc, rr, 1.0, loss_type, eps)
    assert_fails(no_beta.mean(), out["loss"], TRL_TOL)
    if average:
        summed, _, _ = dpo_loss(spc, spr, src, srr, beta, loss_type, eps)
        assert_fails(summed.mean(), out["loss"], TRL_TOL)


@pytest.mark.slow
def test_kto_loss_matches_trl(trl_kit: dict[str, Any]) -> None:
    from datasets import Dataset

    from trl import KTOConfig, KTOTrainer

    beta, wd, wu = 0.5, 1.0, 1.5
    policy, ref = trl_kit["model"](0), trl_kit["model"](1)
    data = Dataset.from_dict({
        "prompt": ["2+2=", "Name a colour:", "Say hi", "1+1="],
        "completion": [" 4", " blue, like the sky", " bye", " 11"],
        "label": [True, True, False, False],
    })
    args = KTOConfig(per_device_train_batch_size=4, beta=beta, desirable_weight=wd, undesirable_weight=wu,
                     **trl_kit["args"])
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data,
                         processing_class=trl_kit["tokenizer"])
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)

    def logps(model: torch.nn.Module, prefix: str = "") -> torch.Tensor:
        labels = batch[prefix + "input_ids"].masked_fill(batch[prefix + "completion_mask"] == 0, -100)
        return logps_of(model, batch[prefix + "input_ids"], batch[prefix + "attention_mask"], labels)

    kl = kto_kl_estimate(logps(policy, "KL_"), logps(ref, "KL_"))
    assert_matches(kl, logged(trainer, "kl"), TRL_TOL)
    assert kl > 1e-3  # the KL term is in play
    desirable = batch["label"].bool()
    losses, rewards = kto_loss(logps(policy), logps(ref), desirable, kl, beta, wd, wu)
    assert_matches(losses.mean(), trl_loss, TRL_TOL)
    assert_matches(rewards[desirable].mean(), logged(trainer, "rewards/chosen"), TRL_TOL)
    assert_matches(rewards[~desirable].mean(), logged(trainer, "rewards/rejected"), TRL_TOL)
    # (c) labels inverted, weights swapped, KL reference point left out
    for wrong in (kto_loss(logps(policy), logps(ref), ~desirable, kl, beta, wd, wu)[0],
                  kto_loss(logps(policy), logps(ref), desirable, kl, beta, wu, wd)[0],
                  kto_loss(logps(policy), logps(ref), desirable, 0.0, beta, wd, wu)[0]):
        assert_fails(wrong.mean(), trl_loss, TRL_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_loss_matches_trl(trl_kit: dict[str, Any], with_margin: bool) -> None:
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification

    from trl import RewardConfig, RewardTrainer

    model = trl_kit["model"](2, LlamaForSequenceClassification, num_labels=1)
    pairs = dict(PAIRS, margin=[0.5, -0.25]) if with_margin else dict(PAIRS)
    trainer = RewardTrainer(model=model, args=RewardConfig(per_device_train_batch_size=2, **trl_kit["args"]),
                            train_dataset=Dataset.from_dict(pairs), processing_class=trl_kit["tokenizer"])
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = scores.chunk(2)
    margin = batch["margin"] if with_margin else None
    assert_matches(bradley_terry_loss(chosen, rejected, margin).mean(), trl_loss, TRL_TOL)
    # (c) chosen and rejected swapped; the margin added instead of subtracted
    assert_fails(bradley_terry_loss(rejected, chosen, margin).mean(), trl_loss, TRL_TOL)
    if with_margin:
        assert_fails(bradley_terry_loss(chosen, rejected, -batch["margin"]).mean(), trl_loss, TRL_TOL)


def paired_batch_logps(model: torch.nn.Module, batch: dict[str, Any], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Our log-probs of the chosen and rejected answers of a CPO/ORPO batch (TRL's ``*_labels``)."""
    return tuple(  # type: ignore[return-value]
        logps_of(model, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"], average)
        for side in ("chosen", "rejected")
    )


@pytest.mark.slow
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_loss_matches_trl_cpo_trainer(trl_kit: dict[str, Any], eps: float) -> None:
    from datasets import Dataset

    cpo = pytest.importorskip("trl.experimental.cpo")
    beta, simpo_gamma = 2.0, 0.5
    policy = trl_kit["model"](0)
    args = cpo.CPOConfig(per_device_train_batch_size=2, loss_type="simpo", cpo_alpha=0.0, beta=beta,
                         simpo_gamma=simpo_gamma, label_smoothing=eps, **trl_kit["args"])
    trainer = cpo.CPOTrainer(model=policy, args=args, train_dataset=Dataset.from_dict(PAIRS),
                             processing_class=trl_kit["tokenizer"])
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
    chosen, rejected = paired_batch_logps(policy, batch, average=True)
    losses, chosen_rewards, _ = simpo_loss(chosen, rejected, beta, simpo_gamma / beta, eps)
    assert_matches(losses.mean(), trl_loss, TRL_TOL)
    assert_matches(chosen_rewards.mean(), trainer._stored_metrics["train"]["rewards/chosen"][-1], TRL_TOL)
    # (c) gamma itself where gamma/beta belongs; summed instead of averaged log-probs
    assert_fails(simpo_loss(chosen, rejected, beta, simpo_gamma, eps)[0].mean(), trl_loss, TRL_TOL)
    summed_c, summed_r = paired_batch_logps(policy, batch, average=False)
    assert_fails(simpo_loss(summed_c, summed_r, beta, simpo_gamma / beta, eps)[0].mean(), trl_loss, TRL_TOL)


@pytest.mark.slow
def test_orpo_loss_matches_trl_orpo_trainer(trl_kit: dict[str, Any]) -> None:
    from datasets import Dataset

    orpo = pytest.importorskip("trl.experimental.orpo")
    beta = 0.3
    policy = trl_kit["model"](0)
    trainer = orpo.ORPOTrainer(model=policy, args=orpo.ORPOConfig(per_device_train_batch_size=2, beta=beta, **trl_kit["args"]),
                               train_dataset=Dataset.from_dict(PAIRS), processing_class=trl_kit["tokenizer"])
    batch = first_batch(trainer)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        chosen_logits = policy(input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]).logits
    chosen, rejected = paired_batch_logps(policy, batch, average=True)
    # TRL's SFT term: mean token cross-entropy over the chosen sequences' prompt *and* answer
    full = batch["chosen_input_ids"].masked_fill(batch["chosen_attention_mask"] == 0, -100)
    nll = -sequence_logps(chosen_logits, full).sum() / token_counts(full).sum()
    losses, log_odds = orpo_loss(chosen, rejected, nll, beta)
    assert_matches(losses.mean(), trl_loss, TRL_TOL)
    assert_matches(log_odds.mean(), trainer._stored_metrics["train"]["log_odds_chosen"][-1], TRL_TOL)
    # (c) the odds-ratio term with the wrong sign; the NLL over the answer tokens only
    wrong_sign = nll + beta * torch.nn.functional.logsigmoid(log_odds)
    assert_fails(wrong_sign.mean(), trl_loss, TRL_TOL)
    answer_nll = -sequence_logps(chosen_logits, batch["chosen_labels"]).sum() / token_counts(batch["chosen_labels"]).sum()
    assert_fails(orpo_loss(chosen, rejected, answer_nll, beta)[0].mean(), trl_loss, TRL_TOL)
