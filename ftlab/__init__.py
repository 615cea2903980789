"""ftlab: fine-tuning experiments composed with Hydra and trained with Lightning."""

from ftlab.known_warnings import filter_known

__version__ = "0.1.0"

filter_known()
