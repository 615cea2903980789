"""Run: ``python bench/_runners.py SPEC.json OUT.json`` (what bench/peers.py and bench/utilization.py start)

One training run of one tool (``ftlab``, ``trl``, ``plain``) in one setting, timed per step, for
the peer comparison and the utilization benchmark. Each run is meant to be its own process (peak
RSS is then the run's own); ``run(spec)`` also works in-process (the quick test).

The three tools train the same thing:

- the same weights: ftlab's ``model`` group loads them (``model=llama``: SmolLM2-135M-Instruct,
  converted once from GGUF into a cached HF folder); TRL and the plain loop load that folder
  (``ftlab.models.loading.checkpoint_path``), 4-bit NF4 through the same ``BitsAndBytesConfig``
  (``ftlab.models.quant.bnb_config``: double quantization, bf16 compute where it is native);
- the same batches, in the same order: ``prepare_batches`` encodes ftlab's synthetic data with
  ftlab's data module and records the examples of the first ``steps`` batches exactly as ftlab's
  shuffled training loader yields them (padded layout: encoded examples; packed layout: ftlab's
  packed sequences). TRL gets them as a ``datasets.Dataset`` of ``input_ids``/``labels`` (plus
  ``seq_lengths`` when packed) read in order (``train_sampling_strategy="sequential"``); the plain
  loop collates them itself. Every run records a checksum of each step's (token, label) pairs at the
  labelled positions, so a run that trained on other data or shifted labels shows;
- the same adapter and optimizer: LoRA r/alpha/dropout on all linear layers, torch AdamW at a
  constant learning rate (no warm-up, no weight decay), gradient clipping at norm 1.0, no
  gradient checkpointing (TRL's default of gradient checkpointing on and bf16 on is overridden to
  match the setting, except in the ``defaults`` settings), the seed set before the model loads.

Layouts: ``padded`` right-pads each batch; ``packed`` is ftlab's ``data.packing=true``, the plain
loop on the same packed rows (position ids restarting per example, no attention mask), and TRL's
padding-free path (``padding_free=True``: the batch's sequences flattened into one row, examples
told apart by ``seq_lengths``). TRL's own ``packing=True`` would pack with its best-fit-decreasing
order, i.e. other batches, so it gets ftlab's packs on the same padding-free path instead.

Everything runs on the CPU (ftlab ``trainer.accelerator=cpu``, TRL ``use_cpu=True``).

Precision: ``fp32`` trains in float32 (ftlab ``trainer.precision=32-true``), ``bf16`` under bf16
autocast (``trainer.precision=bf16-mixed``, TRL ``bf16=True``, ``torch.autocast`` in the plain
loop) with float32 weights. ``defaults`` (``lora-defaults-padded``, ``qlora-defaults-padded``) runs
each tool as it comes: ftlab with ``trainer.precision=auto`` (bf16-mixed where bf16 is native),
TRL with its ``SFTConfig`` defaults (bf16 on, gradient checkpointing on), the plain loop in float32.

ftlab runs through ``ftlab.train.train(cfg)``, the function ``python -m ftlab`` runs, with the
composed config of those overrides; for the timing its validation, generation scoring,
checkpointing, loggers, progress bar and model saving are off, and one callback (``StepTimer``)
records when each optimizer step ends. Step times run from one step's end to the next one's,
so they include data loading and collation, the optimizer step and each tool's per-step logging.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: ftlab imports from the repository
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TOOLS = ("ftlab", "trl", "plain")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Setting:
    """A base (``none`` or ``nf4``), a precision (``fp32``, ``bf16``) and a batch layout."""

    quant: str
    precision: str
    layout: str

    @property
    def name(self) -> str:
        return f"{'qlora' if self.quant == 'nf4' else 'lora'}-{self.precision}-{self.layout}"


SETTINGS = {s.name: s for s in (*(Setting(q, p, lay) for q in ("none", "nf4") for p in ("fp32", "bf16")
                                   for lay in ("padded", "packed")),
                                 # each tool as it comes: ftlab trainer.precision=auto; TRL's SFTConfig
                                 # defaults (bf16 on, gradient checkpointing on); the plain loop in fp32
                                 *(Setting(q, "defaults", "padded") for q in ("none", "nf4")))}


@dataclass
class Spec:
    """Everything one run needs; written as JSON for the subprocess."""

    tool: str
    setting: str
    batches_file: str  # JSON written by ``prepare_batches``
    model: str = "llama"  # ftlab's model group: llama (SmolLM2-135M) | tiny
    cache_dir: str = ""  # ftlab's paths.cache_dir (converted weights, tokenized data)
    steps: int = 11
    batch_size: int = 8
    max_length: int = 256
    num_train: int = 2000  # ftlab's default synthetic training set
    seed: int = 0
    lr: float = 2e-4
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    threads: int = 0  # 0: torch's default
    peak_matmul: bool = False  # utilization: time bf16/fp32 matmuls in this process first
    profile_steps: list[int] = field(default_factory=list)  # utilization: ftlab steps to profile
    profile_file: str = ""

    @property
    def cfg(self) -> Setting:
        return SETTINGS[self.setting]


# -- configs and data ------------------------------------------------------------------------------


def ftlab_overrides(spec: Spec, output_dir: str) -> list[str]:
    """The command line ``python -m ftlab`` would get for this run, timing-only parts switched off."""
    s = spec.cfg
    out = [
        f"model={spec.model}", "method=lora", f"quantization={s.quant}", "optimizer=adamw",
        "scheduler=constant", "scheduler.warmup_ratio=0", f"method.lr={spec.lr}", f"method.r={spec.r}",
        f"method.alpha={spec.alpha}", f"method.dropout={spec.dropout}", "method.target_modules=all-linear",
        f"data.batch_size={spec.batch_size}", f"data.max_length={spec.max_length}", f"data.num_train={spec.num_train}",
        "data.num_val=16", f"data.packing={str(s.layout == 'packed').lower()}",
        f"trainer.max_steps={spec.steps}",
        "trainer.gradient_clip_val=1.0", "trainer.enable_checkpointing=false", "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=none", "callbacks=none", "eval.generate=false",
        "eval.num_samples=0", "save_model=false", f"seed={spec.seed}", f"paths.output_dir={output_dir}",
    ]
    if s.precision != "defaults":  # defaults: trainer.precision=auto decides
        out.append(f"trainer.precision={'bf16-mixed' if s.precision == 'bf16' else '32-true'}")
    if spec.cache_dir:
        out.append(f"paths.cache_dir={spec.cache_dir}")
    return out


def compose_cfg(spec: Spec, output_dir: str) -> Any:
    from ftlab.config import compose

    return compose(ftlab_overrides(spec, output_dir))


def model_folder(spec: Spec) -> str:
    """The HF folder ftlab loads for ``spec.model`` (converted or materialized once, cached)."""
    from ftlab.models.loading import checkpoint_path

    cfg = compose_cfg(spec, tempfile.gettempdir())
    return str(checkpoint_path(cfg.model, cfg.paths.cache_dir))


def prepare_batches(spec: Spec, path: str | Path) -> dict[str, Any]:
    """Encode the data with ftlab's data module and write the first ``spec.steps`` training batches
    (lists of examples, in ftlab's shuffled order) to ``path``, with each batch's real tokens,
    label checksum and example lengths. Returns what it wrote."""
    from transformers import AutoConfig

    from ftlab.data.datamodule import FineTuneDataModule
    from ftlab.models.loading import load_tokenizer

    cfg = compose_cfg(spec, tempfile.gettempdir())
    folder = model_folder(spec)
    from ftlab.models.chat_templates import set_chat_template
    from ftlab.models.architecture import model_label

    tokenizer = load_tokenizer(folder)
    set_chat_template(tokenizer, cfg.model.get("chat_template"), model_label(cfg.model))
    context = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
    dm = FineTuneDataModule(cfg.data)
    dm.connect(tokenizer, max_length=context, cache_dir=cfg.paths.cache_dir, packing=spec.cfg.layout == "packed")
    dm.setup()
    loader = dm.train_dataloader()
    loader.collate_fn = list  # the examples themselves, drawn exactly as training draws them
    batches: list[list[dict[str, list[int]]]] = []
    for batch in loader:
        keys = ("input_ids", "labels", "position_ids")
        batches.append([{k: list(ex[k]) for k in keys if k in ex} for ex in batch])
        if len(batches) == spec.steps:
            break
    data = {
        "pad_id": int(dm.collator.pad_id),
        "batches": batches,
        "tokens": [sum(len(ex["input_ids"]) for ex in b) for b in batches],
        "checksums": [label_checksum([(ex["input_ids"], ex["labels"]) for ex in b]) for b in batches],
        "example_lengths": [example_lengths(b) for b in batches],
    }
    Path(path).write_text(json.dumps(data))
    return data


def example_lengths(batch: Sequence[dict[str, list[int]]]) -> list[int]:
    """Lengths of the examples in a batch (packed rows split where position ids restart)."""
    out = []
    for ex in batch:
        positions = ex.get("position_ids")
        if positions is None:
            out.append(len(ex["input_ids"]))
            continue
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        out += [b - a for a, b in zip(starts, starts[1:])]
    return out


def label_checksum(rows: Iterable[tuple[Sequence[int], Sequence[int]]]) -> str:
    """The (input id, label) pairs of a batch's labelled positions, in order: padding and layout do
    not change it, labels shifted against their tokens do."""
    pairs = [(int(i), int(t)) for ids, labels in rows for i, t in zip(ids, labels) if int(t) != IGNORE_INDEX]
    return hashlib.sha1(json.dumps(pairs).encode()).hexdigest()[:12]


def tensor_checksum(batch: Any) -> str:
    ids, labels = batch["input_ids"], batch["labels"]
    return label_checksum([(ids.reshape(-1).tolist(), labels.reshape(-1).tolist())])


def seq_lengths(positions: Sequence[int]) -> list[int]:
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [b - a for a, b in zip(starts, starts[1:])]


# -- timing -----------------------------------------------------------------------------------------


class Recorder:
    """Per optimizer step: when it ended, its loss and its labels' checksum."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.checksums: list[str] = []

    def step_end(self) -> None:
        self.ends.append(time.perf_counter() - self.start)

    def as_dict(self) -> dict[str, Any]:
        return {"step_ends": self.ends, "losses": self.losses, "checksums": self.checksums}


RECORDER = Recorder()


def _profiler(spec: Spec) -> Any:
    """A torch profiler for the steps ``spec.profile_steps`` names (None when there are none)."""
    if not spec.profile_steps:
        return None
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU], record_shapes=True)


def step_timer_class() -> type:
    """The Lightning callback ftlab's config instantiates (``callbacks.bench_timer``)."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Records each step's end, loss and label checksum into ``RECORDER``; profiles the
        steps ``SPEC.profile_steps`` names."""

        spec: Spec | None = None

        def __init__(self) -> None:
            self.prof: Any = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            steps = self.spec.profile_steps if self.spec else []
            if steps and trainer.global_step == steps[0] and self.prof is None:
                self.prof = _profiler(self.spec)
                self.prof.__enter__()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            RECORDER.step_end()
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            RECORDER.losses.append(float(loss))
            RECORDER.checksums.append(tensor_checksum(batch))
            steps = self.spec.profile_steps if self.spec else []
            if self.prof is not None and trainer.global_step - 1 == steps[-1]:
                self.prof.__exit__(None, None, None)
                write_profile(self.prof, self.spec, len(steps))
                self.prof = None

    return StepTimer


def write_profile(prof: Any, spec: Spec, steps: int) -> None:
    """Self CPU time per op (with input shapes) of the profiled steps, as JSON rows."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        rows.append({"name": e.key, "shapes": str(e.input_shapes), "self_us": e.self_cpu_time_total,
                     "count": e.count})
    Path(spec.profile_file).write_text(json.dumps({"steps": steps, "ops": rows}))


# -- the three tools ----------------------------------------------------------------------------


def run_ftlab(spec: Spec, data: dict[str, Any]) -> dict[str, Any]:
    """``ftlab.train.train(cfg)`` with the ``StepTimer`` callback added to the composed config."""
    from omegaconf import OmegaConf

    from ftlab.train import train

    timer = step_timer_class()
    timer.spec = spec
    module = sys.modules[__name__]
    setattr(module, "StepTimer", timer)
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg(spec, out)
        OmegaConf.set_struct(cfg, False)
        cfg.callbacks = {"bench_timer": {"_target_": f"{__name__}.StepTimer"}}
        train(cfg)
        record = json.loads((Path(out) / "metrics.json").read_text())
    return {"trainable_params": record.get("trainable_params"), "total_params": record.get("total_params")}


def load_hf_model(spec: Spec) -> tuple[Any, Any]:
    """The weights ftlab loads, from the same folder, quantized with the same config."""
    from transformers import AutoModelForCausalLM, set_seed

    from ftlab.models.loading import load_tokenizer
    from ftlab.models.quant import bnb_config

    cfg = compose_cfg(spec, tempfile.gettempdir())
    folder = model_folder(spec)
    quant = bnb_config(cfg.quantization)
    set_seed(spec.seed)  # as ftlab seeds before loading: the LoRA A init draws from the same state
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=quant, device_map={"": "cpu"} if quant else None)
    return model, load_tokenizer(folder)


def lora_config(spec: Spec) -> Any:
    import peft

    return peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=spec.r, lora_alpha=spec.alpha,
                           lora_dropout=spec.dropout, target_modules="all-linear")


def trl_dataset(spec: Spec, data: dict[str, Any]) -> Any:
    """The batches' examples in order; packed rows carry ``seq_lengths`` (TRL's padding-free input)."""
    from datasets import Dataset

    rows = []
    for batch in data["batches"]:
        for ex in batch:
            row = {"input_ids": ex["input_ids"], "labels": ex["labels"]}
            if "position_ids" in ex:
                row["seq_lengths"] = seq_lengths(ex["position_ids"])
            rows.append(row)
    return Dataset.from_list(rows)


def run_trl(spec: Spec, data: dict[str, Any]) -> dict[str, Any]:
    """TRL's ``SFTTrainer`` with a PEFT config, on the batches in order."""
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError as err:
        raise SystemExit(f"bench: TRL is not installed ({err}); pip install 'ftlab[bench]'") from None
    from transformers import TrainerCallback

    model, tokenizer = load_hf_model(spec)
    packed = spec.cfg.layout == "packed"

    class Timed(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            RECORDER.step_end()

    class RecordingTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if model.training:
                RECORDER.checksums.append(tensor_checksum(inputs))
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if model.training:
                RECORDER.losses.append(float(loss.detach()))
            return loss

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", fp16=False,
            bf16=None if spec.cfg.precision == "defaults" else spec.cfg.precision == "bf16",  # None: TRL's default
            gradient_checkpointing=spec.cfg.precision == "defaults",  # TRL's default is on max_length=None if packed else spec.max_length, padding_free=packed, packing=False,
            train_sampling_strategy="sequential", seed=spec.seed, data_seed=spec.seed, report_to="none",
            save_strategy="no", eval_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        )
        trainer = RecordingTrainer(model=model, args=args, train_dataset=trl_dataset(spec, data),
                                   processing_class=tokenizer, peft_config=lora_config(spec), callbacks=[Timed()])
        RECORDER.start = time.perf_counter()
        trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"trainable_params": trainable}


def plain_batches(data: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Right-padded batches (attention mask), or packed rows with position ids restarting per
    example and a pad tail of its own block (no attention mask, no cache)."""
    pad = data["pad_id"]
    for batch in data["batches"]:
        width = max(len(ex["input_ids"]) for ex in batch)
        tails = [width - len(ex["input_ids"]) for ex in batch]
        out = {
            "input_ids": torch.tensor([ex["input_ids"] + [pad] * t for ex, t in zip(batch, tails)]),
            "labels": torch.tensor([ex["labels"] + [IGNORE_INDEX] * t for ex, t in zip(batch, tails)]),
        }
        if "position_ids" in batch[0]:
            out["position_ids"] = torch.tensor([ex["position_ids"] + list(range(t)) for ex, t in zip(batch, tails)])
            out["use_cache"] = False
        else:
            out["attention_mask"] = torch.tensor([[1] * len(ex["input_ids"]) + [0] * t for ex, t in zip(batch, tails)])
        yield out


def run_plain(spec: Spec, data: dict[str, Any]) -> dict[str, Any]:
    """A plain PyTorch + PEFT loop: PEFT's k-bit preparation on a 4-bit base, AdamW, clipping."""
    import contextlib

    import peft

    model, _ = load_hf_model(spec)
    if spec.cfg.quant != "none":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, lora_config(spec)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    bf16 = spec.cfg.precision == "bf16"
    RECORDER.start = time.perf_counter()
    for batch in plain_batches(data):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        RECORDER.losses.append(float(loss.detach()))
        RECORDER.checksums.append(tensor_checksum(batch))
        RECORDER.step_end()
    return {"trainable_params": sum(p.numel() for p in params)}


RUNNERS: dict[str, Callable[[Spec, dict[str, Any]], dict[str, Any]]] = {
    "ftlab": run_ftlab, "trl": run_trl, "plain": run_plain}


# -- peak matmul throughput -------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of the best of repeated ``size``-square matmuls in ``dtype`` on this process's threads."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, packing buffers
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# -- one run ------------------------------------------------------------------------------------------


def run(spec: Spec) -> dict[str, Any]:
    """Train ``spec.tool`` for ``spec.steps`` steps; the step records, peak RSS and peaks (if asked)."""
    global RECORDER
    RECORDER = Recorder()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    data = json.loads(Path(spec.batches_file).read_text())
    out: dict[str, Any] = {"tool": spec.tool, "setting": spec.setting, "threads": torch.get_num_threads()}
    if spec.peak_matmul:
        out["peak_flops"] = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    started = time.perf_counter()
    out.update(RUNNERS[spec.tool](spec, data))
    out["wall_s"] = time.perf_counter() - started
    out.update(RECORDER.as_dict())
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        raise SystemExit("usage: python bench/_runners.py SPEC.json OUT.json")
    spec = Spec(**json.loads(Path(args[0]).read_text()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(spec)
    Path(args[1]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
