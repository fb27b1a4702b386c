"""Data: reading files, detecting formats, validation, splitting, tokenization and packing."""
