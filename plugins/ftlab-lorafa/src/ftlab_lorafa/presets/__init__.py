"""Presets of the lora_fa method, one YAML file each."""
