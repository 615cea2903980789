"""Third-party warnings that tell an ftlab user nothing to act on, each with the reason, filtered here
and nowhere else. ftlab's own warnings and any warning about correctness are never listed."""

from __future__ import annotations

import warnings

# (message regex, category, why it is filtered)
KNOWN: list[tuple[str, type[Warning], str]] = [
    (r"\s*'hydra/launcher/submitit_(local|slurm)' is validated against ConfigStore schema", UserWarning,
     "ftlab's hydra/launcher presets take the plugin's names on purpose, so that Hydra checks them against "
     "the plugin's schema (a misspelt field is still an error)"),
]


def filter_known() -> None:
    """Ignore the warnings of ``KNOWN`` in this process (ftlab's import calls it, so Hydra's
    launcher and every job started from it apply the same list)."""
    for message, category, _ in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category)
