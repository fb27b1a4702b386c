"""Evaluation: generation metrics, loss and perplexity, and the base-versus-tuned comparison."""
