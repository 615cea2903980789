"""Lightning data module: prepared examples -> token ids (cached) -> padded or packed batches.

The module is built from the ``data`` config before the model exists; loading and preparing
the examples needs no tokenizer (so a classification run learns its label set before the model
and its head are built). The training code then calls ``connect(tokenizer, ...)`` once the model
is loaded, LitGPT style, and Lightning calls ``setup()`` and the dataloader hooks.

Encoding runs once per distinct (prepared data, tokenizer and template, labels, pairs): the
token ids are cached under ``cache_dir/tokenized`` and a second run reads them back.

Methods that compare two answers (reward model, DPO, ORPO, SimPO, KTO) call ``connect(...,
pairs=True)``: every example is then encoded as a preference pair and batches hold
``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels``, ``rejected_input_ids``,
``rejected_attention_mask``, ``rejected_labels`` and ``index`` (the example's position in its
split, so a method can keep per-example values such as reference log-probabilities).

RL methods (GRPO) generate their own answers and call ``connect(..., prompts=True)``: every chat
example is then encoded as its prompt alone (``encode_prompt``: the conversation without its final
assistant answer, plus the template's generation prompt) and batches hold ``PROMPT_KEYS``:
``prompt_input_ids`` and ``prompt_attention_mask``, *left*-padded so that every row ends where
generation starts, ``index`` (the example's position in its split) and ``split`` (0 for the training
split, 1 for validation: ``PROMPT_SPLITS``). The method reads what it needs of each example (the
reference answer, the prompt text, any other field) from ``train_records[index]`` or
``val_records[index]`` (``prompt_record(split, index)``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ftlab.data.cache import cached_examples, rows_fingerprint, tokenizer_fingerprint
from ftlab.data.chat_masking import IGNORE_INDEX, encode_prompt
from ftlab.data.schema import DataConfig
from ftlab.data.encode import (CUT_CHARS_PER_TOKEN, CUT_MARGIN, PAIR_SIDES, cut_example, encode_example, encode_pair,
                               example_kind, label_names, longest_text, pad_id_of)
from ftlab.data.formats import pair_record
from ftlab.data.loading import Splits, load_splits, split_records
from ftlab.data.packing import PackedCollator, PackingStats, pack
from ftlab.data.prepare import PrepReport, drop_by_length
from ftlab.data.distributed import RankShareSampler
from ftlab.data.resumable import ResumableLoader
from ftlab.errors import DataError

__all__ = [
    "DataConfig", "FineTuneDataModule", "EncodedDataset", "PAIR_KEYS", "PROMPT_KEYS", "PROMPT_SPLITS", "PadCollator",
    "PairCollator", "PromptCollator", "pad_id_of", "split_records",
]

log = logging.getLogger(__name__)

MODEL_KEYS = ("input_ids", "attention_mask", "labels")
#: The keys of a pair batch (``connect(..., pairs=True)``), each a LongTensor.
PAIR_KEYS = (*(f"{side}_{key}" for side in PAIR_SIDES for key in MODEL_KEYS), "index")
#: The keys of a prompt batch (``connect(..., prompts=True)``), each a LongTensor.
PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask", "index", "split")
#: What a prompt batch's ``split`` values mean: 0 the training split, 1 the validation split.
PROMPT_SPLITS = ("train", "validation")
UNTRUNCATED = 1 << 30  # encode whole, measure, then filter by length and truncate


class EncodedDataset(Dataset):
    """A list of encoded examples (dicts of token-id lists, and an int label for classification)."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class PadCollator:
    """Right-pad a batch: ``pad_id`` in input_ids, 0 in attention_mask, -100 in token labels;
    an int label per example (classification) becomes a vector."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in batch)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        out = {}
        for key, value in fill.items():
            if key == "labels" and not isinstance(batch[0]["labels"], list):
                out[key] = torch.tensor([ex["labels"] for ex in batch], dtype=torch.long)
            else:
                out[key] = torch.tensor([ex[key] + [value] * (width - len(ex[key])) for ex in batch], dtype=torch.long)
        return out


class PairCollator:
    """A batch of preference pairs: each side right-padded to its own width like ``PadCollator``
    (``chosen_*`` and ``rejected_*`` keys), and ``index``, each example's position in its split."""

    def __init__(self, pad_id: int) -> None:
        self.pad = PadCollator(pad_id)

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {}
        for side in PAIR_SIDES:
            padded = self.pad([{key: ex[f"{side}_{key}"] for key in MODEL_KEYS} for ex in batch])
            out.update({f"{side}_{key}": value for key, value in padded.items()})
        out["index"] = torch.tensor([ex["index"] for ex in batch], dtype=torch.long)
        return out


class PromptCollator:
    """A batch of prompts to generate from: ``prompt_input_ids`` left-padded with ``pad_id`` (so
    every row ends where the answer starts), ``prompt_attention_mask`` (0 on the padding), and
    ``index`` and ``split`` of each example (its position in ``PROMPT_SPLITS[split]``)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(ex["prompt_input_ids"]) for ex in batch)
        ids = [[self.pad_id] * (width - len(ex["prompt_input_ids"])) + list(ex["prompt_input_ids"]) for ex in batch]
        mask = [[0] * (width - len(ex["prompt_input_ids"])) + [1] * len(ex["prompt_input_ids"]) for ex in batch]
        return {
            "prompt_input_ids": torch.tensor(ids, dtype=torch.long),
            "prompt_attention_mask": torch.tensor(mask, dtype=torch.long),
            "index": torch.tensor([ex["index"] for ex in batch], dtype=torch.long),
            "split": torch.tensor([ex["split"] for ex in batch], dtype=torch.long),
        }


def _truncate(example: dict[str, Any], max_length: int) -> dict[str, Any]:
    """The model's keys only, token lists cut to ``max_length`` (a prompt is never cut: one longer
    than ``max_length`` is dropped before, since cutting it would drop the generation prompt)."""
    if "prompt_input_ids" in example:
        return {k: v for k, v in example.items() if k in PROMPT_KEYS}
    keys = PAIR_KEYS if "index" in example else MODEL_KEYS
    return {k: (v[:max_length] if isinstance(v, list) else v) for k, v in example.items() if k in keys}


def _trained_tokens(example: dict[str, Any]) -> int:
    """Targets the loss sees: after the causal shift the first token is never one. For a pair,
    those of its poorer side (a pair needs both answers); for a prompt, its tokens (the answer
    is generated)."""
    if "prompt_input_ids" in example:
        return len(example["prompt_input_ids"])
    if "index" in example:
        return min(_trained_tokens({"labels": example[f"{side}_labels"]}) for side in PAIR_SIDES)
    labels = example["labels"]
    return 1 if not isinstance(labels, list) else sum(1 for x in labels[1:] if x != IGNORE_INDEX)


_WHERE = re.compile(r"^(?P<file>.*) (?P<unit>line|row|item) (?P<n>\d+)(?: \(augmented: [^)]*\))?$")


def _file_and_place(where: str) -> tuple[str, str]:
    """``("data/train.jsonl", "line 7")`` from an example's ``_where`` (``"data/train.jsonl line 7"``)."""
    match = _WHERE.match(where)
    return (match["file"], f"{match['unit']} {match['n']}") if match else (where, where)


def _truncation_warnings(rows: list[tuple[dict, int]], max_length: int, keep_tokens: int) -> list[str]:
    """One line per file for the ``(example, token length)`` of rows longer than ``max_length``:
    how many were truncated and the longest (by characters), with where it is."""
    by_file: dict[str, list[tuple[dict, int]]] = {}
    for example, length in rows:
        by_file.setdefault(_file_and_place(str(example.get("_where", "data")))[0], []).append((example, length))
    lines = []
    for file, found in by_file.items():
        example, length = max(found, key=lambda row: (longest_text(row[0]), row[1]))
        chars = longest_text(example)
        if chars > keep_tokens * CUT_CHARS_PER_TOKEN:  # cut before tokenizing: its full token count is unknown
            size = f"a text of {chars:,} characters (only its start was tokenized)"
        else:
            size = f"{length:,} tokens (a text of {chars:,} characters)"
        place = _file_and_place(str(example.get("_where", "data")))[1]
        count = "1 row longer than data.max_length={} tokens is" if len(found) == 1 else \
            f"{len(found)} rows longer than data.max_length={{}} tokens are"
        lines.append(
            f"{file}: {count.format(max_length)} truncated to the first {max_length} tokens (the rest is not trained"
            f" on); the longest is {place}, with {size}. Raise data.max_length to train on more of it, or set"
            " data.max_tokens to drop such rows"
        )
    return lines


def _describe(examples: list[dict]) -> str:
    """What examples without a rejected side are, for the error of a pair request."""
    first = examples[0]
    keys = ", ".join(k for k in first if not k.startswith("_"))
    return f"{example_kind(first)} examples (keys: {keys}; first: {first.get('_where', 'example 1')})"


class FineTuneDataModule(pl.LightningDataModule):
    """Training and validation data of a run, from files, a mix of them, or the built-in sets."""

    def __init__(self, cfg: Any = None) -> None:
        super().__init__()
        self.cfg = DataConfig.from_any(cfg)
        self.tokenizer: Any = None
        self.max_length = self.cfg.max_length
        self.cache_dir: Any = None
        self.packing = self.cfg.packing
        self._splits: Splits | None = None
        self.train_dataset: EncodedDataset | None = None
        self.val_dataset: EncodedDataset | None = None
        self.collator: PadCollator | None = None
        self.train_collator: Any = None
        self.packing_stats: PackingStats | None = None
        self.cache_hits: dict[str, bool] = {}
        self.length_reports: list[PrepReport] = []
        self.truncated_rows: list[tuple[dict, int]] = []  # (example, tokens) of rows cut to max_length
        self.pairs = False
        self.prompts = False

    # -- examples (no tokenizer needed) ------------------------------------------------------------
    @property
    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = load_splits(self.cfg)
            if not self._splits.train:
                raise DataError(f"data '{self.cfg.name}': no training example left after preparation")
        return self._splits

    @property
    def train_records(self) -> list[dict]:
        """Prepared training examples (canonical form, see ``ftlab.data.formats``)."""
        return self.splits.train

    @property
    def val_records(self) -> list[dict]:
        """Prepared validation examples, also the held-out prompts of generation evaluation."""
        return self.splits.val

    @property
    def has_pairs(self) -> bool:
        """Whether the validation examples carry a rejected side (preference data): they can be
        scored as pairs (``val_pairs``), whatever the method trains on."""
        return bool(self.val_records) and all(isinstance(r.get("rejected"), list) for r in self.val_records)

    def pair_records(self, split: str = "validation") -> list[dict]:
        """The examples of ``split`` ("train" or "validation") as preference pairs, in order:
        ``{"index", "prompt", "chosen", "rejected", ...}`` (``ftlab.data.formats.pair_record``:
        messages the sides share, then each side's messages after them), ``index`` being the
        position in the split, the ``index`` of the pair batches."""
        records = {"train": self.train_records, "validation": self.val_records}[split]
        self._require_pairs(records, split)
        return [{"index": i, **pair_record(r)} for i, r in enumerate(records)]

    @property
    def val_pairs(self) -> list[dict]:
        """The held-out preference pairs as records (``pair_records("validation")``)."""
        return self.pair_records("validation")

    def check_pairs(self, method: str | None = None) -> None:
        """DataError unless every training and validation example is a preference pair (what
        ``connect(..., pairs=True)`` needs), naming ``method`` when given and what the data has.
        Needs no tokenizer: a run can refuse a pair method before loading the model."""
        self._require_pairs(self.train_records, "training", method)
        self._require_pairs(self.val_records, "validation", method)

    def check_prompts(self, method: str | None = None) -> None:
        """DataError unless every training and validation example is a chat (what ``connect(...,
        prompts=True)`` needs: a conversation whose prompt an RL method answers), naming ``method``
        when given and what the data has. Needs no tokenizer: a run can refuse before the model loads."""
        for records, split in ((self.train_records, "training"), (self.val_records, "validation")):
            other = [r for r in records if example_kind(r) != "chat"]
            if not other:
                continue
            what = _describe(other) if len(other) == len(records) else (
                f"{len(other)} of {len(records)} examples that are not chats: {_describe(other)}")
            who = f"method '{method}'" if method else "the method"
            raise DataError(
                f"data '{self.cfg.name}': {who} generates answers to chat prompts (instruction, messages, completion or"
                f" preference rows), but the {split} data has {what}"
            )

    def prompt_record(self, split: int | str, index: int) -> dict:
        """The prepared example behind row ``index`` of a prompt batch of ``split`` (0 or "train":
        ``train_records``; 1 or "validation": ``val_records``)."""
        name = PROMPT_SPLITS[split] if isinstance(split, int) else split
        return {"train": self.train_records, "validation": self.val_records}[name][index]

    def _require_pairs(self, records: list[dict], split: str, method: str | None = None) -> None:
        unpaired = [r for r in records if not isinstance(r.get("rejected"), list)]
        if not unpaired:
            return
        what = _describe(unpaired) if len(unpaired) == len(records) else (
            f"{len(unpaired)} of {len(records)} examples without one: {_describe(unpaired)}"
        )
        who = f"method '{method}'" if method else "the method"
        raise DataError(
            f"data '{self.cfg.name}': {who} needs preference pairs, prompt/chosen/rejected rows"
            f" (data.format=preference, or data=preference), but the {split} data has {what}"
        )

    @property
    def kind(self) -> str:
        """``chat``, ``text`` or ``classification``: what the training examples hold."""
        return example_kind(self.train_records[0])

    @property
    def labels(self) -> list[str]:
        """The class names of a classification dataset (``data.labels``, else sorted training labels)."""
        if self.kind != "classification":
            raise DataError(
                f"data '{self.cfg.name}' has no labels (its examples are {self.kind}); task=classification"
                " needs text/label rows (data.format=classification)"
            )
        return label_names(self.train_records, self.cfg.labels)

    # -- tokens ------------------------------------------------------------------------------------
    def connect(
        self, tokenizer: Any, max_length: int | None = None, cache_dir: Any = None, packing: bool | None = None,
        pairs: bool = False, prompts: bool = False,
    ) -> None:
        """Attach the tokenizer; ``max_length`` (the model's context) caps ``cfg.max_length``;
        ``cache_dir`` enables the tokenized-data cache; ``packing`` can switch packing off for
        methods that cannot take packed batches.

        ``pairs=True`` (methods that compare a chosen and a rejected answer) encodes every example
        as a pair: both loaders then give ``PAIR_KEYS`` batches (see ``PairCollator``). The data
        must be preference data (a DataError says what it is otherwise), and packing must be off:
        ``data.packing=true`` with pairs is a DataError unless ``packing=False`` is passed.

        ``prompts=True`` (RL methods, which generate the answers) encodes every example as its
        prompt alone: both loaders then give ``PROMPT_KEYS`` batches (see ``PromptCollator``). The
        data must be chat examples (a DataError says what it is otherwise); a prompt longer than
        ``max_length`` is dropped and counted, not cut; packing must be off as for pairs."""
        self.tokenizer = tokenizer
        self.max_length = self.cfg.max_length if max_length is None else min(self.cfg.max_length, max_length)
        self.cache_dir = cache_dir if self.cfg.cache else None
        self.packing = self.cfg.packing if packing is None else packing
        self.pairs = bool(pairs)
        self.prompts = bool(prompts)
        if self.pairs and self.prompts:
            raise DataError("connect(): pairs=True and prompts=True are two kinds of batches; ask for one")
        if self.prompts:
            if self.packing:
                raise DataError(
                    "data.packing=true cannot be used with prompt batches: an RL method generates each answer after its"
                    " own left-padded prompt; set data.packing=false"
                )
            self.check_prompts()
        if self.pairs:
            if self.packing:
                raise DataError(
                    "data.packing=true cannot be used with preference pairs: each side of a pair is its own"
                    " padded sequence; set data.packing=false"
                )
            self.check_pairs()
        collator = PairCollator if self.pairs else PromptCollator if self.prompts else PadCollator
        self.collator = collator(pad_id_of(tokenizer))
        self.train_dataset = self.val_dataset = None  # re-encode with the new tokenizer

    @property
    def keep_tokens(self) -> int:
        """Tokens of an example that decide what is trained on: its truncation to ``max_length``
        and its checks against ``min_tokens``/``max_tokens``. Text beyond them is cut before
        tokenizing (``ftlab.data.encode.cut_example``)."""
        return max(self.max_length, self.cfg.min_tokens, self.cfg.max_tokens or 0)

    def _encoded(self, examples: list[dict], split: str, label_ids: dict[str, int] | None) -> list[dict]:
        keep = self.keep_tokens

        def build() -> list[dict]:
            out = []
            for index, ex in enumerate(examples):
                if self.pairs:  # a pair's length is its longer side's
                    enc = {**encode_pair(self.tokenizer, ex, UNTRUNCATED, keep), "index": index}
                    length = max(len(enc[f"{side}_input_ids"]) for side in PAIR_SIDES)
                elif self.prompts:  # the prompt alone: the method generates the answer
                    ids = encode_prompt(self.tokenizer, cut_example(self.tokenizer, ex, keep)["messages"])
                    enc = {"prompt_input_ids": ids, "index": index, "split": PROMPT_SPLITS.index(split)}
                    length = len(ids)
                else:
                    enc = encode_example(self.tokenizer, ex, UNTRUNCATED, label_ids, keep)
                    length = len(enc["input_ids"])
                out.append({**enc, "length": length})
            return out

        if self.cache_dir is None:
            return build()
        key = {
            "data": rows_fingerprint(examples),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "labels": label_ids,
        }
        if self.pairs:  # added only for pairs: the entries of unpaired encodings keep their keys
            key["pairs"] = True
        if self.prompts:  # likewise for prompts
            key["prompts"] = True
        if any(longest_text(ex) > keep * CUT_CHARS_PER_TOKEN for ex in examples):  # only then: other keys stay
            key["cut"] = {"keep_tokens": keep, "chars_per_token": CUT_CHARS_PER_TOKEN, "margin": CUT_MARGIN}
        label = f"{self.cfg.name}-{split}" + ("-pairs" if self.pairs else "-prompts" if self.prompts else "")
        encoded, hit = cached_examples(self.cache_dir, key, build, label=label)
        self.cache_hits[split] = hit
        return encoded

    def _encode(self, examples: list[dict], split: str, label_ids: dict[str, int] | None) -> EncodedDataset:
        """Encoded examples within the token-length limits, truncated to ``max_length``; examples
        that truncation leaves with nothing to train on are dropped (and counted), the ones it
        shortens are counted (``PrepReport.truncated``) and kept in ``truncated_rows``."""
        c = self.cfg
        encoded = self._encoded(examples, split, label_ids)
        report = PrepReport(source=f"{c.name} ({split}, tokens)", rows=len(encoded), kept=len(encoded))
        within = drop_by_length(list(range(len(encoded))), [ex["length"] for ex in encoded], c.min_tokens, c.max_tokens,
                                report)
        if self.prompts:  # a cut prompt would lose its generation prompt: drop it instead
            fitting = [i for i in within if encoded[i]["length"] <= self.max_length]
            if len(fitting) < len(within):
                report.drop(f"prompt longer than max_length={self.max_length}", len(within) - len(fitting))
            within = fitting
        truncated = [_truncate(encoded[i], self.max_length) for i in within]
        kept_rows = [i for i, ex in zip(within, truncated) if _trained_tokens(ex) > 0]
        kept = [ex for ex in truncated if _trained_tokens(ex) > 0]
        shortened = [i for i in kept_rows if encoded[i]["length"] > self.max_length]
        report.truncated = len(shortened)
        self.truncated_rows += [(examples[i], encoded[i]["length"]) for i in shortened]
        if len(kept) < len(truncated):
            sides = " in the chosen or the rejected side" if self.pairs else ""
            report.drop(f"no answer tokens left{sides} after truncation to max_length={self.max_length}",
                        len(truncated) - len(kept))
        self.length_reports.append(report)
        if report.dropped:
            log.warning("%s: dropped %d of %d %s examples: %s", c.name, len(encoded) - len(kept), len(encoded), split,
                        ", ".join(f"{n} {why}" for why, n in report.dropped.items()))
        if self.prompts and encoded and not kept:
            raise DataError(f"{c.name}: every {split} prompt is longer than max_length={self.max_length} tokens;"
                            " raise data.max_length")
        if truncated and not kept:
            raise DataError(f"{c.name}: every {split} example lost its assistant tokens to truncation;"
                            f" raise data.max_length (now {self.max_length})")
        return EncodedDataset(kept)

    def setup(self, stage: str | None = None) -> None:
        """Encode both splits (once; ``connect`` must have been called), pack the training split."""
        if self.tokenizer is None:
            raise RuntimeError("call connect(tokenizer) before setup()")
        if self.train_dataset is not None:
            return
        label_ids = {name: i for i, name in enumerate(self.labels)} if self.kind == "classification" else None
        self.length_reports, self.truncated_rows = [], []
        self.train_dataset = self._encode(self.train_records, "train", label_ids)
        self.val_dataset = self._encode(self.val_records, "validation", label_ids)
        for line in _truncation_warnings(self.truncated_rows, self.max_length, self.keep_tokens):
            log.warning("%s", line)
        lengths = [max(len(ex[f"{side}_input_ids"]) for side in PAIR_SIDES) if self.pairs
                   else len(ex["prompt_input_ids"]) if self.prompts else len(ex["input_ids"])
                   for ex in self.train_dataset.examples]
        log.info(
            "%s: %d train / %d validation examples, train tokens mean %.1f max %d",
            self.cfg.name, len(self.train_dataset), len(self.val_dataset),
            sum(lengths) / max(len(lengths), 1), max(lengths, default=0),
        )
        self.train_collator = self.collator
        if self.packing:
            if self.kind == "classification":
                raise DataError("data.packing=true does not apply to classification: each example is one sequence with one label")
            sequences, self.packing_stats = pack(self.train_dataset.examples, self.max_length, self.cfg.batch_size)
            self.train_dataset = EncodedDataset(sequences)
            self.train_collator = PackedCollator(pad_id_of(self.tokenizer))
            s = self.packing_stats
            log.info(
                "packing: %d examples into %d sequences of up to %d tokens; padding %d -> %d tokens (%.0f%% removed)",
                s.examples, s.sequences, self.max_length, s.padded_tokens_unpacked, s.padded_tokens_packed,
                100 * s.padding_removed,
            )

    def summary(self) -> dict[str, Any]:
        """What the data was and what preparation, caching and packing did, for metrics.json."""
        out = self.splits.summary()
        out["kind"] = self.kind
        if self.pairs:
            out["pairs"] = True
        if self.prompts:
            out["prompts"] = True
        if self.kind == "classification":
            out["labels"] = self.labels
        out["preparation"] += [r.as_dict() for r in self.length_reports]
        if self.train_dataset is not None:
            out["train_examples"] = self.packing_stats.examples if self.packing_stats else len(self.train_dataset)
            out["val_examples"] = len(self.val_dataset or [])
        if self.cache_hits:
            out["tokenized_cache_hit"] = self.cache_hits
        if self.packing_stats is not None:
            out["packing"] = self.packing_stats.as_dict()
        return out

    # -- loaders -----------------------------------------------------------------------------------
    def resume_at(self, generator_state: torch.Tensor | None, batches: int) -> None:
        """The next training loader continues an epoch: its generator at ``generator_state``, its
        first ``batches`` batches left out (a checkpoint's data position, ``ftlab.checkpoints``)."""
        self._resume = (generator_state, batches)

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a generator seeded by ``cfg.seed``: same seed, same batch order; resumable
        mid-epoch (``ResumableLoader``)."""
        assert self.train_dataset is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.cfg.seed)
        trainer = getattr(self, "trainer", None)
        world = int(getattr(trainer, "world_size", 1) or 1)
        # several ranks: each takes its strided share of the one-process order (ftlab.data.distributed)
        sampler = RankShareSampler(self.train_dataset, generator, world, int(trainer.global_rank)) if world > 1 else None
        loader = ResumableLoader(
            self.train_dataset,
            batch_size=self.cfg.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            collate_fn=self.train_collator,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )
        resume, self._resume = getattr(self, "_resume", None), None
        if resume is not None:
            loader.resume_at(*resume)
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """In order; an empty list (Lightning skips validation) when there is no validation data.

        It has a generator of its own because every DataLoader iteration draws a seed from its
        generator, by default the global one: validating would then shift the dropout masks of
        every later training step, and evaluating must never change training."""
        assert self.val_dataset is not None, "call setup() first"
        if len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset,
            batch_size=self.cfg.eval_batch_size,
            shuffle=False,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )
