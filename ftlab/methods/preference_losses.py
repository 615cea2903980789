"""Loss functions of the preference methods (DPO and its variants, SimPO, ORPO, KTO, reward models)
as pure torch functions: tensors in, tensors out, no model and no trainer.

Conventions shared by every function here:

- Log-probabilities are per sequence (shape ``[B]``), as ``sequence_logps`` returns them: the sum
  (or, with ``average=True``, the mean) of the log-probabilities of a sequence's labelled tokens.
- A loss function returns the *per-example* losses (``[B]``); the caller reduces them (``.mean()``),
  which is what TRL does too.
- Rewards are returned detached: they are for logging and accuracy metrics, never for gradients.
- Hyperparameters are checked here, and a bad value raises ``ftlab.errors.ConfigError`` naming the
  config field (``method.<field>``) and what is valid, so a method class can pass its config
  fields straight through.

Each loss was checked against a hand computation and against TRL 1.16's own trainers on a tiny
model (``tests/methods/test_preference_losses.py``); where TRL's convention and a paper's differ,
the docstring says which one is followed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ftlab.errors import ConfigError

__all__ = [
    "AVERAGED_LOGPS_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "IGNORE_INDEX",
    "bradley_terry_loss",
    "dpo_loss",
    "kto_kl_estimate",
    "kto_loss",
    "orpo_loss",
    "sequence_logps",
    "simpo_loss",
    "token_counts",
]

IGNORE_INDEX = -100  # label of a token that is not scored (prompt, padding), as in transformers

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

# DPO loss types whose inputs are *per-token averaged* log-probabilities
# (``sequence_logps(..., average=True)``) rather than sums; see ``dpo_loss``.
AVERAGED_LOGPS_LOSS_TYPES = frozenset({"ipo"})


# --------------------------------------------------------------------------------------------
# argument checks


def _number(value: object) -> float:
    """``value`` as a float, NaN when it is not a number (so every range check below fails)."""
    if isinstance(value, (bool, str)):
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _check_positive(value: float, field: str) -> None:
    number = _number(value)
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"method.{field}={value!r} must be a finite number > 0")


def _check_beta(beta: float) -> None:
    _check_positive(beta, "beta")


def _check_smoothing(label_smoothing: float, loss_type: str) -> None:
    if not (0.0 <= _number(label_smoothing) < 0.5):
        raise ConfigError(
            f"method.label_smoothing={label_smoothing!r} must be in [0, 0.5) for loss_type={loss_type} "
            "(the probability that a preference label is flipped)"
        )


# --------------------------------------------------------------------------------------------
# log-probabilities


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 to float32 (float32 and float64 stay as they are)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_counts(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of scored tokens per sequence, ``[B]`` (long): the labels after the causal shift
    (``labels[:, 1:]``) that are not ``ignore_index`` -- the denominator of
    ``sequence_logps(..., average=True)``."""
    return (labels[:, 1:] != ignore_index).sum(dim=-1)


def sequence_logps(
    logits: Tensor, labels: Tensor, average: bool = False, *, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Per-sequence log-probability of the label tokens, ``[B]`` (float32, float64 for float64 logits).

    ``log p(y|x) = sum_t log softmax(logits[:, t-1])[labels[:, t]]`` over the positions ``t >= 1``
    whose label is not ``ignore_index`` (the causal shift: ``logits[:, :-1]`` predict
    ``labels[:, 1:]``). With ``average=True`` the sum is divided by the number of scored tokens
    (``token_counts``; a sequence with none gives 0 rather than NaN).

    Memory: the log-softmax is never materialised for the whole batch; each row computes
    ``logit[label] - logsumexp(logits)`` (in float32 for half-precision logits), so the extra
    memory is one ``[T, V]`` row, and autograd keeps only the logits (which exist anyway).

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` token ids, ``ignore_index`` where a token is not scored.
        average: mean over the scored tokens instead of the sum (length-normalised log-prob,
            as IPO, SimPO and ORPO use).
    """
    if logits.dim() != 3 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be [B, T, V] with labels [B, T], got labels {tuple(labels.shape)}"
        )
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != ignore_index
    safe_labels = labels.masked_fill(~mask, 0)
    rows = []
    for row_logits, row_labels in zip(logits, safe_labels):
        row = _upcast(row_logits)
        picked = row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    per_token = torch.stack(rows) if rows else _upcast(logits.new_zeros(labels.shape))
    totals = (per_token * mask).sum(dim=-1)
    if average:
        return totals / mask.sum(dim=-1).clamp(min=1)
    return totals


# --------------------------------------------------------------------------------------------
# pairwise losses with a reference model


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO and its pairwise variants; returns ``(losses[B], chosen_rewards[B], rejected_rewards[B])``.

    With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)`` and ``eps =
    label_smoothing``:

    - ``sigmoid`` -- DPO, Rafailov et al. 2023 (arXiv:2305.18290), Eq. 7, with the conservative
      label smoothing of cDPO (Mitchell 2023, "A note on DPO with noisy preferences"):
      ``-(1 - eps) * logsigmoid(beta*h) - eps * logsigmoid(-beta*h)``. (TRL 1.16's "sigmoid"
      has no smoothing; at ``eps = 0`` the two agree.)
    - ``ipo`` -- IPO, Azar et al. 2023 (arXiv:2310.12036), Eq. 17: ``(h - 1/(2*beta))**2``, beta
      being the paper's tau. Convention (TRL's, confirmed there with the IPO authors): the
      log-probabilities are *averaged per completion token*, so pass
      ``sequence_logps(..., average=True)`` for all four inputs (``AVERAGED_LOGPS_LOSS_TYPES``).
      This equals TRL's ``(sum_c - ref_sum_c)/n_c - (sum_r - ref_sum_r)/n_r``. The rewards are then
      per-token too (TRL logs the summed ones).
    - ``hinge`` -- the rank-calibration hinge of SLiC-HF, Zhao et al. 2023 (arXiv:2305.10425), on
      the reference log-ratios as TRL has it: ``relu(1 - beta*h)`` (beta is the inverse margin).
    - ``robust`` -- rDPO, Chowdhury et al. 2024 (arXiv:2403.00409), unbiased under
      preference flips with probability ``eps`` in [0, 0.5):
      ``(-(1 - eps) * logsigmoid(beta*h) + eps * logsigmoid(-beta*h)) / (1 - 2*eps)``.

    Rewards are ``beta * (policy - ref)`` of the inputs, detached (Rafailov et al., Sec. 5).
    ``label_smoothing`` must be 0 for ``ipo`` and ``hinge``, which do not use it.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"method.loss_type={loss_type!r} is not valid; use one of: {', '.join(DPO_LOSS_TYPES)}")
    _check_beta(beta)
    if loss_type in ("sigmoid", "robust"):
        _check_smoothing(label_smoothing, loss_type)
    elif label_smoothing != 0:
        raise ConfigError(
            f"method.label_smoothing={label_smoothing!r} is not used by loss_type={loss_type}; set it to 0 "
            "(label smoothing applies to loss_type sigmoid and robust)"
        )
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    h = chosen_logratios - rejected_logratios
    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# --------------------------------------------------------------------------------------------
# reference-free pairwise losses


def simpo_loss(
    policy_chosen_avg: Tensor,
    policy_rejected_avg: Tensor,
    beta: float,
    gamma_beta_ratio: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734); returns ``(losses, chosen_rewards, rejected_rewards)``.

    ``-logsigmoid(beta * (avg_c - avg_r) - gamma)`` with ``gamma = gamma_beta_ratio * beta`` (the
    paper's code fixes the ratio gamma/beta), written as ``z = beta * (avg_c - avg_r -
    gamma_beta_ratio)`` and smoothed as cDPO: ``-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)``.
    The inputs are length-averaged log-probs (``sequence_logps(..., average=True)``); the rewards
    are ``beta * avg``, detached. TRL's CPOTrainer(loss_type="simpo") takes gamma itself
    (``simpo_gamma``): ``gamma_beta_ratio = simpo_gamma / beta``.
    """
    _check_beta(beta)
    ratio = _number(gamma_beta_ratio)
    if not (math.isfinite(ratio) and ratio >= 0):
        raise ConfigError(
            f"method.gamma_beta_ratio={gamma_beta_ratio!r} must be a finite number >= 0 "
            "(gamma / beta: SimPO's target reward margin divided by beta)"
        )
    _check_smoothing(label_smoothing, "simpo")
    eps = float(label_smoothing)
    z = beta * (policy_chosen_avg - policy_rejected_avg - gamma_beta_ratio)
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return losses, beta * policy_chosen_avg.detach(), beta * policy_rejected_avg.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable on both sides of ``-log 2`` (Maechler 2012):
    ``log1p(-exp(x))`` far from 0, ``log(-expm1(x))`` near it."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    chosen_nll: Tensor | float,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """ORPO, Hong et al. 2024 (arXiv:2403.07691); returns ``(losses[B], log_odds_ratio[B])``.

    ``losses = chosen_nll + beta * -logsigmoid(log_odds_ratio)`` (beta is the paper's lambda), where
    ``log_odds_ratio = log(odds(p_c) / odds(p_r))``, ``odds(p) = p / (1 - p)`` and ``p = exp(avg
    logp)`` the length-normalised likelihood, i.e. ``(a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))``
    computed stably, in at least float32 (``log1mexp(a) = log(1 - exp(a))``, via ``log1p(-exp(a))`` /
    ``log(-expm1(a))``).

    ``chosen_nll`` is the SFT term, a ``[B]`` tensor or a scalar (it broadcasts). TRL's
    ORPOTrainer uses one scalar: the token-level mean cross-entropy over the chosen sequences'
    prompt *and* completion; with that scalar the mean of ``losses`` is TRL's loss. The
    ``log_odds_ratio`` returned is detached, for logging.
    """
    _check_beta(beta)
    a_c = _upcast(chosen_avg_logps)
    a_r = _upcast(rejected_avg_logps)
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach()


# --------------------------------------------------------------------------------------------
# unpaired (KTO)


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, arXiv:2402.01306): a scalar, the batch
    mean of ``log pi(y'|x) - log pi_ref(y'|x)`` over mismatched pairs ``(x, y')`` (TRL rotates the
    completions within a batch by one), detached and clamped at 0. Under data parallelism the mean
    should be all-reduced across ranks before the clamp, as TRL does."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO, Ethayarajh et al. 2024 (arXiv:2402.01306), Eq. 7; returns ``(losses[B], rewards[B])``.

    With ``r = policy_logps - ref_logps`` (summed log-probs) and ``z0 = kl`` (``kto_kl_estimate``,
    detached here again): a desirable example loses ``desirable_weight * (1 - sigmoid(beta*(r -
    z0)))``, an undesirable one ``undesirable_weight * (1 - sigmoid(beta*(z0 - r)))``. The losses
    stay in batch order (TRL concatenates desirable then undesirable; the mean is the same).
    ``rewards = beta * r``, detached.
    """
    _check_beta(beta)
    _check_positive(desirable_weight, "desirable_weight")
    _check_positive(undesirable_weight, "undesirable_weight")
    if desirable.dtype != torch.bool or desirable.shape != policy_logps.shape:
        raise ValueError(
            f"desirable must be a bool tensor shaped like policy_logps {tuple(policy_logps.shape)}, "
            f"got {desirable.dtype} {tuple(desirable.shape)}"
        )
    z0 = kl.detach() if isinstance(kl, Tensor) else kl
    logratios = policy_logps - ref_logps
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    return losses, beta * logratios.detach()


# --------------------------------------------------------------------------------------------
# reward model


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None) -> Tensor:
    """Reward-model loss under the Bradley-Terry model (Ouyang et al. 2022, arXiv:2203.02155,
    Eq. 1; margin as in Llama 2, Touvron et al. 2023, Eq. 2): ``-logsigmoid(r_c - r_r - margin)``
    per pair, ``[B]``. ``margin`` (``[B]`` or scalar) defaults to 0."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
