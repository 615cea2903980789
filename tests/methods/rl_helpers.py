"""What the RL method tests share: a run of an RL method on model=tiny assembled as ``ftlab.build``
assembles one for a ``batch_kind = "prompt"`` method, and a reward a random model can learn."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

import torch
from omegaconf import OmegaConf

from ftlab.config import compose
from ftlab.testing import registered

# settings under which the tiny model learns ``first_vowel`` in a dozen steps
LEARNABLE = ("method.max_new_tokens=1", "method.num_generations=8", "method.lr=1e-2",
             "method.target_modules=[q_proj,v_proj,lm_head]")  # the tiny model's own head is too small to move much


@contextlib.contextmanager
def method_available(name: str, cls: type) -> Iterator[None]:
    """``method=<name>`` for the duration: as installed, or registered for the test."""
    from ftlab.registry import get_registry

    if name in get_registry().methods:
        yield
        return
    with registered(name, cls):
        yield


def rl_run(cache_dir: Path, cls: type, *overrides: str, batch_size: int = 4, train: int = 16) -> SimpleNamespace:
    """model=tiny with the RL method ``cls`` applied (``method=<its name>``), a data module giving
    prompt batches, and its first training batch."""
    import pytorch_lightning as pl

    from ftlab.data.datamodule import FineTuneDataModule
    from ftlab.models.loading import load_model
    from ftlab.registry import get_registry

    name = next(n for n, info in get_registry().methods.items() if info.cls is cls)
    cfg = compose(["model=tiny", f"method={name}", "logger=none", "callbacks=none", f"data.num_train={train}",
                   "data.num_val=8", f"data.batch_size={batch_size}", "data.eval_batch_size=4",
                   f"paths.cache_dir={cache_dir}", "method.max_new_tokens=4", *overrides])
    pl.seed_everything(cfg.seed)
    base, tokenizer = load_model(cfg.model, cfg.quantization, cache_dir=cfg.paths.cache_dir)
    method = cls(OmegaConf.to_object(cfg.method))
    model = method.apply(base)
    data = FineTuneDataModule(cfg.data)
    data.connect(tokenizer, max_length=model.config.max_position_embeddings, cache_dir=cfg.paths.cache_dir,
                 prompts=True, packing=False)
    data.setup("fit")
    method.use_data(tokenizer, data.train_records, data.val_records)
    batch = next(iter(data.train_dataloader()))
    return SimpleNamespace(cfg=cfg, method=method, model=model, tokenizer=tokenizer, data=data, batch=batch)


def first_vowel(prompt: str, completion: str, record: Mapping[str, Any]) -> float:
    """A toy reward a random model can learn: 1 when the answer starts with a vowel."""
    return float(completion[:1].lower() in "aeiou")


def expected_first_token_reward(run: SimpleNamespace) -> float:
    """The exact expected ``first_vowel`` reward of one-token answers to the batch's prompts: the
    policy's next-token distribution times each token's reward (no sampling noise)."""
    table = torch.tensor([first_vowel("", run.tokenizer.decode([t], skip_special_tokens=True), {})
                          for t in range(len(run.tokenizer))])
    ids, mask = run.batch["prompt_input_ids"], run.batch["prompt_attention_mask"]
    run.model.eval()
    with torch.no_grad():
        logits = run.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return float((logits[:, -1].softmax(-1) * table).sum(-1).mean())


def rl_steps(run: SimpleNamespace, steps: int, lr: float = 1e-2) -> None:
    """``steps`` optimizer steps of the run's method on its one batch, in a run's order (the step
    hook, the loss, backward, the update), with AdamW without weight decay."""
    optimizer = torch.optim.AdamW(run.method.parameter_groups(run.model, lr), lr=lr, weight_decay=0.0)
    for step in range(steps):
        run.model.train()
        run.method.on_train_step_start(run.model, optimizer, step)
        loss = run.method.loss(run.model, run.batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def check_reward_moves(run: SimpleNamespace, sign: float, steps: int = 12) -> tuple[float, float]:
    """Reward the run's method with ``sign * first_vowel``: a dozen steps must raise the expected
    reward of the batch's one-token answers well above a random model's (sign +1), or lower it
    (sign -1, the control: a method that ignored the reward's sign would fail one of the two)."""
    run.method.reward_fn = lambda prompt, completion, rec: sign * first_vowel(prompt, completion, rec)
    before = expected_first_token_reward(run)
    rl_steps(run, steps)
    after = expected_first_token_reward(run)
    if sign > 0:
        assert before < 0.3 and after > before + 0.3, (before, after)
    else:
        assert after < before - 0.1, (before, after)
    return before, after


def moved_on_a_quantized_base(run: SimpleNamespace) -> list[str]:
    """Two steps of the run's method (rewarded by ``first_vowel``) on its 4/8-bit base: the names of
    the trainable parameters that changed, after checking every one did (LoRA's A gets a gradient
    once B has left zero, hence two)."""
    from ftlab.models.quant import quantized_layers

    assert quantized_layers(run.model)
    run.method.reward_fn = first_vowel
    trainable = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    rl_steps(run, 2)
    moved = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert len(moved) == len(trainable), sorted(set(trainable) - set(moved))[:5]
    return moved
