"""Public API for method plugins: the method hooks and their config base (``ftlab.methods.base``).

Plugins import from here; the module behind it may move, this name stays.
"""

from ftlab.methods.base import *  # noqa: F401,F403
from ftlab.methods.base import __all__  # noqa: F401
