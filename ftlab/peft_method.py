"""Public API for method plugins: the base of PEFT tuners.

Plugins import from here; the module behind it (``ftlab.methods.peft_base``) may move, this name stays.
``targeted_modules`` / ``fused_parameter_targets`` / ``may_fuse_targets`` tell a method's
``refuse_model`` which layers (and MoE parameters) a PEFT config would select on a model's
meta-device skeleton, before anything loads.
"""

from ftlab.methods.peft_base import (PeftMethod, fused_parameter_targets, is_quantized, may_fuse_targets,
                                     merge_dequantized, module_names, targeted_modules)

__all__ = ["PeftMethod", "fused_parameter_targets", "is_quantized", "may_fuse_targets", "merge_dequantized",
           "module_names", "targeted_modules"]
