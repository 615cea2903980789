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


class DivergedError(FtlabError):
    """Training that diverged (raised by ``ftlab.guards``): a non-finite loss or gradient, a loss stuck
    at the value of a uniform output or risen far above its start, weights grown by orders of
    magnitude. ``step``: the optimizer step it was seen at; ``reason``: the rule that fired
    (``nonfinite_loss``, ``nonfinite_grad``, ``uniform_loss``, ``loss_rise``, ``weight_growth``)."""

    def __init__(self, message: str, step: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.reason = reason

    def __reduce__(self):  # keeps step and reason through pickling (a sweep launcher's worker process)
        return type(self), (str(self), self.step, self.reason)


class FolderBusyError(FtlabError):
    """A run or sweep folder another ftlab process is training into (``ftlab.locks``)."""


class Interrupted(SystemExit):
    """A run stopped by SIGINT or SIGTERM (``ftlab.interrupts``): not an error but an ending, whose
    exit status is the shell's for the signal, 128 + its number (130, 143). A ``SystemExit``, so a
    sweep stops too (a failed job lets a sweep go on; an interrupted one does not)."""

    def __init__(self, signum: int, message: str = "") -> None:
        import signal

        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        self.message = message or f"interrupted by {self.signal_name}"
