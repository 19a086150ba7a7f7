"""Small shared helpers: atomic file writing (``io``), process groups (``distributed``), and the one
rule for the device and the mixed-precision dtype (``amp``; its accepted values, torch-free, in
``choices``)."""
