"""Errors caused by the user's config or data: reported as one clear message, not a traceback."""


class FtlabError(ValueError):
    """Bad input (a config value, a file, a method name): the message says what and what is valid."""


class ConfigError(FtlabError):
    """A composed config that cannot run, e.g. a method on a quantized base it cannot train."""


class MethodError(FtlabError):
    """A method name or field that does not exist, a plugin that cannot be used, or a hook a
    method cannot honour (e.g. merging prompt tuning into weights)."""
