"""Every error ftlab expects: bad input (a config value, a file, a method name, a run folder) that the
user can fix. Each one is an ``FtlabError``, which the command line reports as one line,
``ftlab: error: <message>``, and a non-zero exit instead of a traceback; the message says what is
wrong and what is valid. Anything else that escapes is a bug and keeps its traceback.

All of ftlab's exception classes live here (tests/test_errors.py checks it). The modules that
raise them import them from here, and also re-export them, so the older import locations
(``ftlab.models.loading.ModelLoadError``, ``ftlab.data.sources.DataError``, ...) keep working.
"""


class FtlabError(ValueError):
    """Bad input (a config value, a file, a method name): the message says what and what is valid."""


class ConfigError(FtlabError):
    """A composed config that cannot run, e.g. a method on a quantized base it cannot train."""


class MethodError(FtlabError):
    """A method name or field that does not exist, a plugin that cannot be used, or a hook a
    method cannot honour (e.g. merging prompt tuning into weights)."""


class ModelStructureError(ConfigError):
    """A part of the model a method needs (its decoder blocks, final norm, a block's attention or
    MLP) cannot be found in it (raised by ``ftlab.models.structure``): the model's architecture
    does not fit the method as configured."""


class DataError(FtlabError):
    """A data file or record does not have the expected shape (raised by ``ftlab.data``)."""


class ModelLoadError(FtlabError):
    """A model config that cannot be turned into a model (missing package, bad field, ...)."""


class ExportError(FtlabError):
    """An export that cannot be made as asked (a taken --out, --merge of a prompt method, ...)."""


class GgufError(FtlabError):
    """A model or tokenizer the GGUF writer (``ftlab export --gguf``) cannot represent faithfully."""


class ChatError(FtlabError):
    """A folder or setting ``ftlab generate`` / ``ftlab chat`` cannot work with."""
