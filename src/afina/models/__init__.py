"""Loading models (bundled default, local directory, hub id) and preparing them for training."""
