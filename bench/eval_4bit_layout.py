"""Run: ``python bench/eval_4bit_layout.py [--prompts 8] [--new-tokens 16] [--rows 8] [--seq-len 256]
[--repeats 3] [--threads 1]``

What keeping bitsandbytes' standard 4-bit layout costs evaluation on a CPU with AVX512-BF16.

bitsandbytes (0.50 here, since its CPU fused 4-bit kernel) repacks a ``Linear4bit`` weight into
a CPU-only tiled layout the first time the layer runs in eval mode without grad on such a CPU; backward through a repacked layer drops
gradients, so ``ftlab.models.loading.load_model`` turns the repack off (``keep_standard_4bit_layout``).
This loads the default model (SmolLM2-135M-Instruct, ``quantization=nf4``) twice through ftlab's
config and loader: (a) as ftlab loads it (standard layout), and (b) a second copy with
``support_avx512bf16_for_cpu = True`` set back on every ``Linear4bit`` (packed layout; it repacks
on its first eval forward). On a CPU without AVX512-BF16 the packed path does not exist and only
(a) is measured.

Two evaluation workloads, timed in this process, interleaved (a, b, a, b, ...) after one warm-up
call each (the packed copy's first warm-up call includes its one-time repack):

* generation: greedy decoding of exactly ``--new-tokens`` tokens (``min_new_tokens`` = max) for
  the first ``--prompts`` synthetic validation prompts in one left-padded batch, prompts built
  with ``encode_prompt`` like ``ftlab.evaluation.generation``;
* forward: one eval-mode, no-grad forward with loss (validation-loss style) over ``--rows`` x
  ``--seq-len`` tokens cut from the validation chats concatenated.

Reports median seconds, packed / standard ratios, the max absolute logit difference between
the layouts on the same forward input (the packed path rounds absmax to bf16 and computes in
bf16), the loss difference, and how many answers of ``ftlab.evaluation.generation.generate_ids`` (greedy,
cut at the stop token, as ftlab's exact match sees them) agree. The first run converts the GGUF
once into ``paths.cache_dir`` (~30 s; ``FTLAB_CACHE`` moves it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import torch

Timings = dict[tuple[str, str], float]  # (workload, layout) -> seconds


def linear4bit_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--prompts", type=int, default=8, help="validation prompts in the generation batch")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per prompt")
    parser.add_argument("--rows", type=int, default=8, help="rows of the forward batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row of the forward batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per layout and workload")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is steadiest on a busy CPU; 0 keeps torch's own choice)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import importlib.util

    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from ftlab.config import compose
    from ftlab.data.chat_masking import encode_chat, encode_prompt
    from ftlab.data.synthetic import default_splits
    from ftlab.evaluation.generation import generate_ids, stop_token_ids
    from ftlab.models.loading import load_model
    from ftlab.models.quant import REPACK_SWITCH, is_cpu_packed

    hf_logging.disable_progress_bar()
    cfg = compose(["model=llama", "quantization=nf4"])
    load_start = time.perf_counter()
    standard, tokenizer = load_model(cfg.model, cfg.quantization, cache_dir=cfg.paths.cache_dir)
    load_seconds = time.perf_counter() - load_start
    standard.eval()
    layers = linear4bit_layers(standard)
    packable = bool(has_avx512bf16())
    models: dict[str, torch.nn.Module] = {"standard": standard}
    if packable:
        packed, _ = load_model(cfg.model, cfg.quantization, cache_dir=cfg.paths.cache_dir)
        packed.eval()
        for layer in linear4bit_layers(packed):
            setattr(layer, REPACK_SWITCH, True)
        models["packed"] = packed

    print(f"model                      {cfg.model.name} (SmolLM2-135M-Instruct), quantization={cfg.quantization.name}"
          f", {len(layers)} Linear4bit layers, loaded in {load_seconds:.1f}s")
    print(f"compute dtype              {layers[0].compute_dtype} (bnb_4bit_compute_dtype: "
          f"{cfg.quantization.bnb_4bit_compute_dtype}); unquantized weights {cfg.model.dtype}")
    print(f"torch / bitsandbytes       {torch.__version__} / {bnb.__version__}, "
          f"torch threads {torch.get_num_threads()} (--threads), {os.cpu_count()} CPUs")
    print(f"AVX512-BF16 (bitsandbytes) {packable}")
    if packable:
        kernel = ("kernels-community gemm_4bit_forward" if importlib.util.find_spec("kernels")
                  else "bitsandbytes' own gemv_4bit_inference_cpu (package 'kernels' not installed)")
        print(f"packed-layout matmul       {kernel}")
    else:
        print("packed layout              does not exist on this CPU (bitsandbytes never repacks here): "
              "measuring the standard layout only")

    # -- inputs: synthetic validation split as ftlab builds it ---------------------------------
    _, val = default_splits(int(cfg.data.num_train), int(cfg.data.num_val), int(cfg.seed))
    records = val[: args.prompts]
    ids, mask = left_pad([encode_prompt(tokenizer, r["messages"]) for r in records], int(tokenizer.pad_token_id))
    stop = stop_token_ids(tokenizer, standard)
    gen_config = GenerationConfig(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
        eos_token_id=stop, pad_token_id=int(tokenizer.pad_token_id), use_cache=True,
    )
    stream: list[int] = []
    for record in val:
        stream += encode_chat(tokenizer, record["messages"], int(cfg.data.max_length))["input_ids"]
        if len(stream) >= args.rows * args.seq_len:
            break
    if len(stream) < args.rows * args.seq_len:
        raise SystemExit(f"validation split has only {len(stream)} tokens; lower --rows or --seq-len")
    fwd_ids = torch.tensor(stream[: args.rows * args.seq_len], dtype=torch.long).view(args.rows, args.seq_len)
    fwd_batch = {"input_ids": fwd_ids, "attention_mask": torch.ones_like(fwd_ids), "labels": fwd_ids}

    def generate(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
            return out[:, ids.shape[1]:]
        return run

    def forward(model: torch.nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(**fwd_batch)
        return run

    workloads = {"generation": generate, "forward": forward}
    warmup: Timings = {}
    outputs: dict[tuple[str, str], Any] = {}
    for work, make in workloads.items():
        for name, model in models.items():
            warmup[work, name], outputs[work, name] = timed(make(model))
    if packable:
        n_packed = sum(is_cpu_packed(m) for m in linear4bit_layers(models["packed"]))
        n_std = sum(is_cpu_packed(m) for m in layers)
        print(f"repacked layers            packed copy {n_packed}/{len(layers)}, standard copy {n_std}/{len(layers)}")
    times: dict[tuple[str, str], list[float]] = {key: [] for key in warmup}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both layouts alike
        for work, make in workloads.items():
            for name, model in models.items():
                times[work, name].append(timed(make(model))[0])

    print()
    gen_desc = f"generate {args.prompts} x {args.new_tokens} tok (prompt width {ids.shape[1]})"
    fwd_desc = f"forward {args.rows} x {args.seq_len} tok, eval, no grad"
    descs = {"generation": gen_desc, "forward": fwd_desc}
    header = f"{'workload':<46}{'layout':<10}{'warm-up s':>10}{'median s':>10}{'min s':>8}{'tok/s':>9}"
    print(header)
    print("-" * len(header))
    tokens = {"generation": args.prompts * args.new_tokens, "forward": args.rows * args.seq_len}
    median = {key: statistics.median(v) for key, v in times.items()}
    for work in workloads:
        for name in models:
            key = (work, name)
            print(f"{descs[work]:<46}{name:<10}{warmup[key]:>10.2f}{median[key]:>10.2f}{min(times[key]):>8.2f}"
                  f"{tokens[work] / median[key]:>9.1f}")
    print(f"({args.repeats} timed calls each after the warm-up; the packed warm-up includes the one-time repack)")

    if packable:
        answers = {name: generate_ids(model, tokenizer, records, args.new_tokens, batch_size=len(records))
                   for name, model in models.items()}
        compare(outputs, median, {key: min(v) for key, v in times.items()}, workloads, answers)
    print(f"\ntotal wall time            {time.perf_counter() - started:.0f}s")


def compare(outputs: dict[tuple[str, str], Any], median: Timings, fastest: Timings, workloads: dict[str, Any],
            answers: dict[str, list[list[int]]]) -> None:
    """Ratios of the two layouts, and how far apart their outputs on the same inputs are."""
    print()
    for work in workloads:
        ratio = median[work, "packed"] / median[work, "standard"]
        best = fastest[work, "packed"] / fastest[work, "standard"]
        print(f"packed / standard time, {work:<11} {ratio:.2f} (medians), {best:.2f} (fastest calls): "
              f"the standard layout takes {1 / ratio:.2f}x the packed time")
    std_out, packed_out = outputs["forward", "standard"], outputs["forward", "packed"]
    diff = (std_out.logits - packed_out.logits).abs()
    print(f"forward logits             max |diff| {diff.max().item():.4f}, mean |diff| {diff.mean().item():.5f}"
          f" (max |logit| {std_out.logits.abs().max().item():.2f}); argmax agrees on "
          f"{(std_out.logits.argmax(-1) == packed_out.logits.argmax(-1)).float().mean().item():.1%} of positions")
    print(f"forward loss               standard {std_out.loss.item():.5f}  packed {packed_out.loss.item():.5f}"
          f"  |diff| {abs(std_out.loss.item() - packed_out.loss.item()):.2e}")
    std_gen, packed_gen = outputs["generation", "standard"], outputs["generation", "packed"]
    print(f"generated tokens (forced)  identical in {(std_gen == packed_gen).float().mean().item():.1%} of "
          f"{std_gen.numel()} positions, {sum(bool((a == b).all()) for a, b in zip(std_gen, packed_gen))}/"
          f"{len(std_gen)} rows")
    same = sum(a == b for a, b in zip(answers["standard"], answers["packed"]))
    print(f"ftlab greedy answers       identical for {same}/{len(answers['standard'])} prompts (generate_ids, "
          f"cut at the stop token)")


if __name__ == "__main__":
    main()
