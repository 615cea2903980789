"""Run: ``python bench/lm_head.py [--model llama|tiny] [--batches 6] [--repeats 3] [--precision bf16|fp32] [--packing]``

What projecting only the labelled positions onto the vocabulary (``ftlab.methods.lm_loss``, the
default loss) saves against transformers' own ``model(**batch).loss``, which computes logits at
every position: LoRA (r16, all linear layers) on the default model (SmolLM2-135M, 49,152-token
vocabulary; ``--model tiny`` for a quick look), ftlab's default synthetic training data, batches
of 8 encoded by ftlab's data module. Both losses run on the same model and batches in this
process, interleaved (A B A B ...), forward + backward; the best of ``--repeats`` passes is
compared, and the memory the largest tensor of each path needs is printed from its shape.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any, Callable

import torch

from ftlab.build import build_model
from ftlab.config import compose
from ftlab.data.datamodule import FineTuneDataModule
from ftlab.methods.lm_loss import causal_lm_loss, target_positions


def encoded_batches(cfg: Any, tokenizer: Any, count: int) -> list[dict[str, Any]]:
    data = FineTuneDataModule(cfg.data)
    data.connect(tokenizer, cache_dir=cfg.paths.cache_dir, packing=bool(cfg.data.packing))
    data.setup("fit")
    return [b for _, b in zip(range(count), data.train_dataloader())]


def timed_pass(model: torch.nn.Module, batches: list[dict[str, Any]], loss: Callable, bf16: bool) -> float:
    """Seconds for forward + backward over the batches."""
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            value = loss(model, batch)
        value.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="ftlab model group (llama: SmolLM2-135M; tiny)")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--packing", action="store_true")
    args = parser.parse_args()
    cfg = compose([f"model={args.model}", "method=lora", "data.batch_size=8", f"data.packing={str(args.packing).lower()}"])
    _, model, tokenizer = build_model(cfg)
    model.train()
    batches = encoded_batches(cfg, tokenizer, args.batches + 1)
    warmup, timed = batches[0], batches[1:]
    vocab = model.get_output_embeddings().weight.shape[0]
    positions = sum(b["input_ids"].numel() for b in timed)
    targets = sum(int(target_positions(b["labels"])[1].numel()) for b in timed)
    print(f"{args.model}: vocabulary {vocab}, {len(timed)} batches of 8 ({'packed' if args.packing else 'padded'}), "
          f"{positions} positions, {targets} labelled targets ({targets / positions:.1%})")
    paths: dict[str, Callable] = {"all positions": lambda m, b: m(**b).loss, "labelled only": causal_lm_loss}
    bf16 = args.precision == "bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        model.eval()
        losses = {name: float(fn(model, warmup)) for name, fn in paths.items()}
        model.train()
    print("loss on one batch (eval mode): " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    for fn in paths.values():
        timed_pass(model, [warmup], fn, bf16)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            seconds[name].append(timed_pass(model, timed, fn, bf16))
    best = {name: min(v) for name, v in seconds.items()}
    for name in paths:
        rows = positions if name == "all positions" else targets
        print(f"  {name:14s} best {best[name]:6.2f}s of {[round(s, 2) for s in seconds[name]]}  "
              f"fp32 logits {rows * vocab * 4 / 2**20:7.1f} MB")
    print(f"labelled only / all positions, time: {best['labelled only'] / best['all positions']:.3f} "
          f"({args.precision}, best of {args.repeats})")


if __name__ == "__main__":
    main()
