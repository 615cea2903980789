"""Public API for method plugins: the method hooks and their config base.

Plugins import from here; the module behind it (``ftlab.methods.base``) may move, this name stays.
"""

from ftlab.methods.base import (
    QUANTIZATIONS,
    TASKS,
    BaseMethod,
    MethodConfig,
    ObjectiveWithMetrics,
    config_fields,
    field_default,
    field_help,
    reset_optimizer_state,
)

__all__ = ["BaseMethod", "MethodConfig", "ObjectiveWithMetrics", "QUANTIZATIONS", "TASKS", "config_fields", "field_default",
           "field_help",
           "reset_optimizer_state"]
