"""Inference for served models: resolving and loading them, a continuous-batching engine, and
constrained decoding for JSON output."""
