"""The data layer: where training examples come from and how they become batches.

A run's data flows: source -> format -> preparation -> template/tokenize -> mask -> pack.

* ``sources``: rows from JSONL, JSON, CSV, Parquet, a saved ``datasets`` folder or a hub id.
* ``formats``: alpaca, messages, completion, text, classification, preference -> one canonical example
  (a ranked preference list -> one per pair).
* ``prepare``, ``augment``: whitespace, missing fields, duplicates, augmentation plugins, with a report.
* ``loading``: splits, multi-task mixing by weight, ``data.limit`` (few-shot).
* ``synthetic``, ``topics``: the built-in instruction tasks and the labelled topic data.
* ``chat``, ``encode``: chat-template rendering with labels on the assistant's tokens; text and
  classification encoding.
* ``cache``: tokenized data kept on disk by fingerprint; ``packing``: several examples per sequence.
* ``config``, ``datamodule``: the ``data`` config node and ``FineTuneDataModule``.

Nothing is imported here, so ``import ftlab.data.synthetic`` stays free of torch and Lightning.
"""
