"""afina: fine-tune open language models on your own data, prove the tuned model is better, serve it."""

__version__ = "0.1.0"
