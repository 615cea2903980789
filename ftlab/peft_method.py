"""Public API for method plugins: the base of PEFT tuners.

Plugins import from here; the module behind it (``ftlab.methods.peft_base``) may move, this name stays.
"""

from ftlab.methods.peft_base import PeftMethod, is_quantized, merge_dequantized, module_names

__all__ = ["PeftMethod", "is_quantized", "merge_dequantized", "module_names"]
