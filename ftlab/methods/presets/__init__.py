"""ftlab's own method presets (``*.yaml`` here), declared through the ``ftlab.presets`` entry
point exactly as a plugin's presets are."""
