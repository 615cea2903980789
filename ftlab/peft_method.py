"""Public API for method plugins: the base of PEFT tuners (``ftlab.methods.peft_base``).

Plugins import from here; the module behind it may move, this name stays.
"""

from ftlab.methods.peft_base import *  # noqa: F401,F403
from ftlab.methods.peft_base import __all__  # noqa: F401
