"""The data layer: where training examples come from and how they become batches.

* ``synthetic``: the built-in, seeded instruction tasks with exactly checkable answers.
* ``sources``: strict JSONL loading, normalized to ``{"messages": [...]}``.
* ``chat``: chat-template rendering with labels on the assistant's tokens only.
* ``datamodule``: ``ChatDataModule``, the Lightning data module built from the ``data`` config.

Nothing is imported here, so ``import ftlab.data.synthetic`` stays free of torch and Lightning.
"""
