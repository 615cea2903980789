"""Run: ``python bench/utilization.py [--settings lora-fp32-padded,lora-bf16-padded,lora-bf16-packed,qlora-bf16-packed] [--steps 11] [--profile] [--json FILE]``

How much of this machine's matmul throughput ftlab's training turns into model FLOPs: achieved
FLOP/s of ``python -m ftlab`` training (``bench/_runners.py``: ``ftlab.train.train`` with
validation, generation scoring, checkpointing and loggers off) over the bf16 and fp32 matmul peak
measured in the same process just before it trains (the best of repeated 2048-square
``torch.matmul`` calls, on the same threads), per setting. The target for packed LoRA bf16 is 60%
of the bf16 peak.

FLOPs counted per real (non-padding) token, in an example of ``l`` tokens::

    4 * N_frozen + 6 * N_trainable + 6 * n_layers * d_model * l

``N_frozen``: the weights of the base's matrix multiplies (every linear layer of the blocks and the
LM head; not the input embedding, a lookup): forward 2, input gradient 2, no weight gradient.
``N_trainable``: the LoRA parameters: forward 2, both gradients 4. The last term is causal
attention (QK^T and AV: 2 * 2 * d_model FLOPs per query-key pair forward, 3x with the backward, an
example's l(l+1)/2 pairs spread over its l tokens). Padding tokens and the attention a packed row
spends across example boundaries are not counted: they are no useful work. Norms, activations,
softmax, the loss and the optimizer are not counted either (a few % at most).

``--profile`` also runs torch.profiler over two timed steps of packed LoRA bf16 and splits their
wall time by what the ops do: the LM head and the loss, attention, the other matmuls (frozen and
LoRA), dtype casts, dropout, the optimizer, the rest of the ops, and the time outside torch ops
(Python, Lightning, collation).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runners import SETTINGS, Spec, model_folder, prepare_batches  # noqa: E402
from peers import run_subprocess, throughput  # noqa: E402

DEFAULT_SETTINGS = ("lora-fp32-padded", "lora-bf16-padded", "lora-bf16-packed", "qlora-bf16-packed")
PROFILED = "lora-bf16-packed"
TARGET = 0.60


def model_sizes(folder: str) -> dict[str, int]:
    """Sizes of a Llama-style config: layers, width, and the frozen matmul weights (blocks + LM head)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    d, ff, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q = c.num_attention_heads * head_dim
    kv = c.num_key_value_heads * head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ff
    return {"layers": layers, "d_model": d, "vocab": vocab, "n_frozen": layers * per_layer + d * vocab,
            "n_lm_head": d * vocab}


def step_flops(lengths: Sequence[int], sizes: dict[str, int], n_trainable: int) -> float:
    """Model FLOPs of one step whose examples have ``lengths`` real tokens (formula in the docstring)."""
    per_token = 4 * sizes["n_frozen"] + 6 * n_trainable
    attention = 6 * sizes["layers"] * sizes["d_model"]
    return float(sum(n * per_token + attention * n * n for n in lengths))


CATEGORIES = (
    ("LM head + loss", lambda name, shapes, vocab: str(vocab) in shapes and name in MATMULS
     or any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy", "logsumexp"))),
    ("attention", lambda name, shapes, vocab: "scaled_dot_product" in name or "flash_attention" in name),
    ("other matmuls (frozen + LoRA)", lambda name, shapes, vocab: name in MATMULS or "gemm" in name
     or "bitsandbytes" in name or "dequantize" in name),
    ("dtype casts", lambda name, shapes, vocab: name in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone")),
    ("dropout", lambda name, shapes, vocab: "bernoulli" in name or "dropout" in name),
    ("optimizer", lambda name, shapes, vocab: "_foreach" in name or "adam" in name.lower() or "clip_grad" in name),
)
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}


def breakdown(profile: dict[str, Any], wall_s: float, vocab: int) -> list[tuple[str, float]]:
    """Seconds per category of the profiled steps' ops (self time), and the time outside ops."""
    totals = {name: 0.0 for name, _ in CATEGORIES}
    totals["other ops (norms, activations, elementwise)"] = 0.0
    for op in profile["ops"]:
        shapes = op["shapes"]
        category = next((cat for cat, match in CATEGORIES if match(op["name"], shapes, vocab)),
                        "other ops (norms, activations, elementwise)")
        totals[category] += op["self_us"] / 1e6
    in_ops = sum(totals.values())
    totals["outside torch ops (Python, Lightning, collation)"] = max(wall_s - in_ops, 0.0)
    return sorted(totals.items(), key=lambda kv: -kv[1])


def top_ops(profile: dict[str, Any], n: int = 8) -> list[dict[str, Any]]:
    return sorted(profile["ops"], key=lambda op: -op["self_us"])[:n]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"from: {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--profile", action="store_true", help=f"profile two timed steps of {PROFILED}")
    parser.add_argument("--model", default="llama", help="ftlab model group: llama (SmolLM2-135M) | tiny")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if args.profile and args.steps < args.warmup + 2:
        parser.error("--profile needs --steps >= --warmup + 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out: dict[str, Any] = {"args": vars(args), "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data: dict[str, dict[str, Any]] = {}
        for setting in args.settings:
            layout = SETTINGS[setting].layout
            spec = Spec(tool="ftlab", setting=setting, batches_file=str(workdir / f"batches-{layout}.json"),
                        model=args.model, cache_dir=args.cache_dir, steps=args.steps, num_train=args.num_train,
                        peak_matmul=True)
            if layout not in data:
                data[layout] = prepare_batches(spec, spec.batches_file)
            if args.profile and setting == PROFILED:
                spec = replace(spec, profile_steps=[args.warmup, args.warmup + 1],
                               profile_file=str(workdir / "profile.json"))
            print(f"ftlab {setting}", file=sys.stderr, flush=True)
            result = run_subprocess(spec, workdir, setting)
            if spec.profile_file:
                result["profile"] = json.loads(Path(spec.profile_file).read_text())
            out["settings"][setting] = result
        sizes = model_sizes(model_folder(spec))
    report(args, data, out, sizes)


def report(args: argparse.Namespace, data: dict[str, dict[str, Any]], out: dict[str, Any],
           sizes: dict[str, int]) -> None:
    print(f"model={args.model}: {sizes['layers']} layers, d_model {sizes['d_model']}, vocab {sizes['vocab']}, "
          f"frozen matmul weights {sizes['n_frozen'] / 1e6:.1f}M (LM head {sizes['n_lm_head'] / 1e6:.1f}M)")
    print("FLOPs per real token = 4*N_frozen + 6*N_trainable + 6*n_layers*d_model*example_length; "
          f"steps {args.warmup}..{args.steps - 1}")
    header = (f"{'setting':18s} {'tokens/s':>8s} {'GFLOP/s':>8s} {'bf16 peak':>9s} {'fp32 peak':>9s} "
              f"{'% of bf16':>9s} {'% of fp32':>9s}")
    print(header)
    print("-" * len(header))
    for setting, result in out["settings"].items():
        layout = SETTINGS[setting].layout
        d = data[layout]
        ends = result["step_ends"]
        timed = range(args.warmup, len(ends))
        flops = sum(step_flops(d["example_lengths"][i], sizes, result["trainable_params"]) for i in timed)
        seconds = ends[-1] - ends[args.warmup - 1]
        tps, _ = throughput(result, d["tokens"], args.warmup)
        achieved = flops / seconds
        peak = result["peak_flops"]
        result["achieved_flops"] = achieved
        result["utilization"] = {k: achieved / v for k, v in peak.items()}
        print(f"{setting:18s} {tps:8.1f} {achieved / 1e9:8.1f} {peak['bf16'] / 1e9:9.1f} {peak['fp32'] / 1e9:9.1f} "
              f"{100 * achieved / peak['bf16']:8.1f}% {100 * achieved / peak['fp32']:8.1f}%")
    packed = out["settings"].get(PROFILED)
    if packed is not None:
        reached = packed["utilization"]["bf16"]
        print(f"target: {PROFILED} >= {TARGET:.0%} of the bf16 matmul peak; reached {reached:.1%}"
              f" ({'met' if reached >= TARGET else 'not met'})")
    if packed is not None and "profile" in packed:
        profile = packed["profile"]
        ends = packed["step_ends"]
        wall = ends[args.warmup + 1] - ends[args.warmup - 1]
        print(f"\nwhere {PROFILED} time goes (torch.profiler, steps {args.warmup}..{args.warmup + 1}, {wall:.2f} s wall, "
              "op self time on the main thread)")
        for name, seconds in breakdown(profile, wall, sizes["vocab"]):
            print(f"  {name:50s} {seconds:7.2f} s {100 * seconds / wall:5.1f}%")
        print("  top ops by self time:")
        for op in top_ops(profile):
            shapes = ast.literal_eval(op["shapes"]) if op["shapes"].startswith("[") else op["shapes"]
            print(f"    {op['name']:45s} {op['self_us'] / 1e6:7.2f} s  x{op['count']:<5d} {str(shapes)[:60]}")
        profile["ops"] = top_ops(profile, 50)  # the JSON keeps the 50 ops with the most self time
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
