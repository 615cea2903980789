"""PPO (ftlab.methods.ppo) and reward models as rewards (ftlab.methods.reward.RewardModel).

(a) The pieces by hand, each written here another way than the code writes it: GAE as the
    explicit sum of discounted TD errors, returns as discounted reward sums (lam = 1), whitening
    with numpy's variance, per-token rewards, and the clipped policy and value losses (values and
    gradients; clipped tokens get no gradient). TRL 1.16 ships no PPO trainer to compare with.
(b) The value head reads the final hidden states (the backbone's output), starts at 0, and is not
    in the saved adapter.
(c) Runs on model=tiny: a rollout feeds ``ppo_epochs * num_mini_batches`` optimizer steps (its
    first pass has ratio 1); on a reward a random model can learn, steps raise the expected reward
    and a negated reward lowers it; a QLoRA base trains; a reward model run scores rollouts.
(d) The whole pipeline from the command line: SFT -> reward model -> PPO with that reward model ->
    ftlab export -> ftlab generate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pytest
import torch

from ftlab.config import compose
from ftlab.errors import ConfigError
from ftlab.methods.ppo import (VALUE_HEAD, Ppo, gae, logps_and_values, masked_whiten, ppo_loss,
                               token_rewards)

from rl_helpers import (LEARNABLE, check_reward_moves, first_vowel, method_available, moved_on_a_quantized_base,
                        rl_run)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _ppo_registered() -> Iterator[None]:
    with method_available("ppo", Ppo):
        yield


def ppo_run(cache_dir: Path, *overrides: str, batch_size: int = 4) -> SimpleNamespace:
    return rl_run(cache_dir, Ppo, *overrides, batch_size=batch_size)


# -- (a) by hand ---------------------------------------------------------------------------------------


def test_gae_is_the_discounted_sum_of_td_errors() -> None:
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.1, -0.4, 9.0], [1.0, -1.0, 7.0, 7.0]])  # past the mask: ignored
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        n = int(mask[row].sum())
        r, v = rewards[row, :n].tolist(), values[row, :n].tolist() + [0.0]  # 0 after the last token
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-6)
            assert returns[row, t].item() == pytest.approx(expected + v[t], abs=1e-6)
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_with_lam_one_the_returns_are_discounted_reward_sums() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[5.0, -2.0, 0.5]])
    returns = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)[1]
    assert returns[0].tolist() == pytest.approx([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0])


def test_masked_whiten_by_hand() -> None:
    values = torch.tensor([[1.0, 2.0, 4.0], [8.0, 100.0, -50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    kept = np.array([1.0, 2.0, 4.0, 8.0])
    expected = (kept - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-8)
    out = masked_whiten(values, mask)
    assert out[0].tolist() + [out[1, 0].item()] == pytest.approx(expected.tolist(), abs=1e-6)
    scaled = masked_whiten(values, mask, shift_mean=False)
    assert scaled[0, 0].item() == pytest.approx(expected[0] + kept.mean(), abs=1e-6)
    one = masked_whiten(torch.tensor([[3.0, 7.0]]), torch.tensor([[1, 0]]))  # no variance: centred only
    assert one[0, 0].item() == 0.0


def test_token_rewards_put_the_score_on_the_last_kept_token() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -1.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, beta=0.1)
    expected = [[-0.1 * 0.5, -0.1 * -1.0 + 2.0, 0.0], [0.0, -0.1 * 1.0, -1.0]]
    assert out.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert token_rewards(torch.tensor([2.0, -1.0]), logps, None, mask, beta=0.1).tolist() == \
        [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]


def test_ppo_loss_and_its_gradients_by_hand() -> None:
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new_p = torch.tensor([[0.5, 0.7, 0.3]])  # ratios 1, 1.4 (clipped above 1.2), 0.6 (clipped below 0.8)
    logps = torch.log(new_p).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    old_v = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 1.5, 0.1]], requires_grad=True)
    ret = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1]])
    out = ppo_loss(logps, values, old, old_v, adv, ret, mask, cliprange=0.2, cliprange_value=0.2, vf_coef=0.5)
    ratios = [1.0, 1.4, 0.6]
    pg = [max(-a * r, -a * min(max(r, 0.8), 1.2)) for a, r in zip([1.0, 1.0, -2.0], ratios)]
    vclip = [0.0 + max(min(0.5, 0.2), -0.2), 1.0 + max(min(0.5, 0.2), -0.2), 0.0 + 0.1]
    vf = [max((v - r) ** 2, (c - r) ** 2) for v, c, r in zip([0.5, 1.5, 0.1], vclip, [1.0, 0.0, 0.0])]
    assert out.policy_loss.item() == pytest.approx(sum(pg) / 3, abs=1e-6)
    assert out.value_loss.item() == pytest.approx(0.5 * sum(vf) / 3, abs=1e-6)
    assert out.loss.item() == pytest.approx(sum(pg) / 3 + 0.5 * 0.5 * sum(vf) / 3, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    out.loss.backward()
    # d(-A r)/d logp = -A r for the unclipped token; clipped tokens (r out of range, in the direction
    # the advantage pushes) get none
    assert logps.grad[0].tolist() == pytest.approx([-1.0 * 1.0 / 3, 0.0, 0.0], abs=1e-6)
    # value grads: vf_coef * 0.5 * 2 (v - R) / 3 where the unclipped term is the larger; token 0's clipped
    # value (0.2) is further from its return (1) than 0.5 is, so the clipped term wins and gives no gradient
    assert vf[0] == (vclip[0] - 1.0) ** 2
    assert values.grad[0].tolist() == pytest.approx([0.0, 0.5 * (1.5 - 0.0) / 3, 0.5 * 0.1 / 3], abs=1e-6)


# -- (b) the value head ------------------------------------------------------------------------------------


def test_the_value_head_reads_the_final_hidden_states_and_is_not_saved(cache_dir: Path, tmp_path: Path) -> None:
    run = ppo_run(cache_dir, "method.num_generations=2")
    head = getattr(run.model, VALUE_HEAD)
    assert head.weight.requires_grad and float(head.weight.detach().abs().sum()) == 0.0
    with torch.no_grad():
        head.weight.normal_()
        head.bias.fill_(0.25)
    run.model.eval()
    rollouts = run.method.rollout(run.model, run.batch)
    with torch.no_grad():
        logps, values = logps_and_values(run.model, rollouts, 1.0)
        ids = torch.cat([rollouts.prompt_ids, rollouts.completion_ids], 1)
        mask = torch.cat([rollouts.prompt_mask, rollouts.completion_mask], 1)
        hidden = run.model.get_base_model().model(input_ids=ids, attention_mask=mask,
                                                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    width = rollouts.completion_ids.shape[1]
    expected = head(hidden[:, -(width + 1):-1]).squeeze(-1)
    assert torch.allclose(values, expected, atol=1e-5)
    run.method.save(run.model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and not any(VALUE_HEAD in k for k in saved)


# -- (c) runs on model=tiny -----------------------------------------------------------------------------


def test_a_rollout_feeds_ppo_epochs_times_minibatches_steps(cache_dir: Path) -> None:
    run = ppo_run(cache_dir, "method.ppo_epochs=2", "method.num_mini_batches=2", "method.num_generations=2",
                  batch_size=2)
    run.method.reward_fn = first_vowel
    logged: list[dict[str, float]] = []
    run.method._log_sink = lambda name, value: logged[-1].__setitem__(name, value)
    optimizer = torch.optim.AdamW(run.method.parameter_groups(run.model, 1e-2), lr=1e-2)
    rollouts, losses = [], []
    for step in range(5):  # in a run's order: the hook, then the loss
        logged.append({})
        run.model.train()
        run.method.on_train_step_start(run.model, optimizer, step)
        loss = run.method.loss(run.model, run.batch)
        again = run.method.loss(run.model, run.batch)  # a second loss in the same step: the same minibatch
        assert again.item() == loss.item()
        rollouts.append(run.method.last_rollouts)
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    # steps 0-3 train on one rollout (4 rows: 2 passes of 2 minibatches of 2), step 4 samples anew
    assert all(r is rollouts[0] for r in rollouts[:4]) and rollouts[4] is not rollouts[0]
    assert rollouts[0].completion_ids.shape[0] == 4
    rows = run.method._current  # tokens/s counts the minibatch each step trains on
    assert rows.numel() == 2
    assert run.method.last_step_tokens == int(rollouts[4].prompt_mask[rows].sum() + rollouts[4].completion_mask[rows].sum())
    assert logged[0]["approx_kl"] == 0.0 and logged[0]["clipfrac"] == 0.0  # the first minibatch: ratio 1
    assert logged[3]["approx_kl"] > 0.0  # later passes see the policy the earlier steps moved
    assert set(run.method.metrics) <= set(logged[0])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_steps_raise_the_expected_reward_and_a_negated_reward_lowers_it(cache_dir: Path, sign: float) -> None:
    check_reward_moves(ppo_run(cache_dir, *LEARNABLE, "method.ppo_epochs=1", "method.beta=0"), sign)


def test_a_qlora_base_trains(cache_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    run = ppo_run(cache_dir, *LEARNABLE[:3], "quantization=nf4", "quantization.bnb_4bit_compute_dtype=float32")
    assert any(VALUE_HEAD in n for n in moved_on_a_quantized_base(run))  # the value head trains too


@pytest.mark.parametrize("overrides,message", [
    (["method.num_generations=0"], r"method.num_generations=0: expected an integer >= 1"),
    (["method.ppo_epochs=0"], r"method.ppo_epochs=0: expected an integer >= 1"),
    (["method.lam=1.5"], r"method.lam=1.5: expected a number in \[0, 1\]"),
    (["method.cliprange=0"], r"method.cliprange=0: expected a number > 0"),
    (["method.reward_model=/no/such/run"], r"method.reward_model=/no/such/run: no such folder"),
    (["method.reward=nope"], r"unknown reward 'nope'"),
    (["trainer.accumulate_grad_batches=2"], r"trainer.accumulate_grad_batches=2: PPO makes one optimizer step per "
                                            r"minibatch"),
])
def test_bad_settings_are_refused_when_the_config_is_composed(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(["model=tiny", "method=ppo", *overrides])


# -- (d) the pipeline from the command line ------------------------------------------------------------------


def cli(*args: str, cwd: Path, rc: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "ftlab", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == rc, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_sft_then_reward_model_then_ppo_then_export_and_generate(cache_dir: Path, tmp_path: Path) -> None:
    """What docs/rlhf.md's pipeline says to run, on model=tiny: each stage a real CLI run."""
    common = ["model=tiny", "logger=none", "data=preference", "data.num_train=64", "data.num_val=16",
              "data.batch_size=4", "eval.num_prompts=4", "trainer.val_check_interval=4", f"paths.cache_dir={cache_dir}"]
    cli(*common, "method=sft", "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'sft'}", cwd=tmp_path)
    cli("export", str(tmp_path / "sft"), "--merge", "--out", str(tmp_path / "sft_model"), cwd=tmp_path)
    from_sft = ["model.kind=pretrained", f"model.name_or_path={tmp_path / 'sft_model'}"]
    cli(*common, *from_sft, "method=reward", "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'rm'}", cwd=tmp_path)
    refused = cli("generate", str(tmp_path / "rm"), "Hi", cwd=tmp_path, rc=1)  # a reward model writes no answers
    assert "holds a reward model (method=reward): it scores answers and writes none" in refused.stderr
    cli(*common, *from_sft, "method=ppo", f"method.reward_model={tmp_path / 'rm'}", "method.max_new_tokens=6",
        "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'ppo'}", cwd=tmp_path)
    metrics = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["method"] == "ppo"
    assert metrics["reward_eval"]["reward"] == f"reward_model:{(tmp_path / 'rm').resolve()}"
    for name in ("mean_reward", "base_mean_reward"):
        assert isinstance(metrics[name], float)
    assert {"reward/mean", "kl", "value_loss", "policy_loss"} <= set(metrics["method_metrics"])
    assert metrics["mean_reward"] != 0.0  # a reward model's scores, not a checker's 0/1 on a random model
    cli("export", str(tmp_path / "ppo"), "--merge", "--out", str(tmp_path / "ppo_model"), cwd=tmp_path)
    done = cli("generate", str(tmp_path / "ppo_model"), "What is 2 + 3?", "--max-new-tokens", "4",
               cwd=tmp_path)
    assert done.stdout  # the tiny random model's answer: 4 tokens, often whitespace
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ppo_model" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "lm_head.weight" in names or "model.embed_tokens.weight" in names
    assert not any(VALUE_HEAD in n for n in names)  # the critic is not part of the policy
