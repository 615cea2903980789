"""Run: ``python bench/packing.py [--examples 1024] [--batch-size 8] [--repeats 3] [--threads 1]``

How much padding packing removes from ftlab's synthetic data, whether the loss stays the same,
and what it does to the wall time of training steps on the tiny model.

The data is ``default_splits(2000, 200, 0)`` encoded with the tiny tokenizer (max_length 256).
The timing trains two copies of the same tiny model, one on padded batches and one on packed
batches of the same examples (first ``--examples`` of the training split), in this process, and
reports packed time / unpacked time for one pass over those examples (best of ``--repeats``
interleaved passes).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any, Callable, Sequence

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from ftlab.data.chat_masking import encode_chat, num_label_tokens
from ftlab.data.datamodule import PadCollator, pad_id_of
from ftlab.data.packing import PackedCollator, pack, real_tokens
from ftlab.data.synthetic import default_splits
from ftlab.models.loading import load_tokenizer
from ftlab.models.tiny import TINY_DEFAULTS, TINY_TOKENIZER_DIR, tiny_checkpoint

MAX_LENGTH = 256


def batches(items: Sequence[Any], size: int, collate: Callable) -> list[dict[str, Any]]:
    return [collate(items[i : i + size]) for i in range(0, len(items), size)]


def train_pass(model: torch.nn.Module, data: list[dict[str, Any]]) -> float:
    """Seconds for forward + backward + optimizer step over every batch (after one warm-up step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict[str, Any]) -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(data[0])
    start = time.perf_counter()
    for batch in data:
        step(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1024, help="examples in the timed pass")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a busy CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    train, _ = default_splits(2000, 200, 0)
    examples = [encode_chat(tokenizer, r["messages"], MAX_LENGTH) for r in train]
    examples = [ex for ex in examples if num_label_tokens(ex) > 0]
    seqs, stats = pack(examples, MAX_LENGTH, args.batch_size)
    print(f"examples                   {stats.examples}")
    print(f"packed sequences           {stats.sequences} (max_length {MAX_LENGTH})")
    print(f"real tokens                {stats.tokens}")
    print(f"padding tokens unpacked    {stats.padded_tokens_unpacked} (batch_size {args.batch_size})")
    print(f"padding tokens packed      {stats.padded_tokens_packed}")
    print(f"padding removed            {stats.padding_removed:.1%}")

    with tempfile.TemporaryDirectory() as cache:
        cfg = OmegaConf.create({"kind": "tiny", **TINY_DEFAULTS})
        model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(cfg, cache)).train()
    pad = PadCollator(pad_id_of(tokenizer))
    packed = PackedCollator(pad_id_of(tokenizer))

    fixed = examples[:32]
    fixed_seqs, _ = pack(fixed, MAX_LENGTH, len(fixed))
    with torch.no_grad():
        loss_unpacked = model(**pad(fixed)).loss.item()
        loss_packed = model(**packed(fixed_seqs)).loss.item()
    print(f"loss on {len(fixed)} examples      unpacked {loss_unpacked:.6f}  packed {loss_packed:.6f}"
          f"  |diff| {abs(loss_packed - loss_unpacked):.2e}")

    timed = examples[: args.examples]
    timed_seqs, _ = pack(timed, MAX_LENGTH, args.batch_size)
    unpacked_batches = batches(timed, args.batch_size, pad)
    packed_batches = batches(timed_seqs, args.batch_size, packed)
    assert sum(map(real_tokens, unpacked_batches)) == sum(map(real_tokens, packed_batches))
    times: dict[str, list[float]] = {"unpacked": [], "packed": []}
    for _ in range(args.repeats):  # interleaved, best of each: load from other users hits both alike
        times["unpacked"].append(train_pass(copy.deepcopy(model), unpacked_batches))
        times["packed"].append(train_pass(copy.deepcopy(model), packed_batches))
    seconds_unpacked, seconds_packed = min(times["unpacked"]), min(times["packed"])
    print(f"train pass over {len(timed)} examples ({args.threads} thread(s), best of {args.repeats})")
    print(f"  unpacked  {len(unpacked_batches):4d} steps  {seconds_unpacked:6.2f}s"
          f"  {sum(b['input_ids'].numel() for b in unpacked_batches)} tokens incl. padding")
    print(f"  packed    {len(packed_batches):4d} steps  {seconds_packed:6.2f}s"
          f"  {sum(b['input_ids'].numel() for b in packed_batches)} tokens incl. padding")
    print(f"  packed / unpacked wall time  {seconds_packed / seconds_unpacked:.2f}")


if __name__ == "__main__":
    main()
