"""afina: fine-tune open language models on your own data, prove the tuned model is better, serve it."""

import os

# bf16 matmuls on CPU go through oneDNN, which caches kernels (and reordered weights) for every input
# shape it meets, 1,024 of each by default. Packed rows vary in length, so over an epoch those caches
# grew to ~0.7 GiB on the default model; 64 bounds them with no measurable loss of speed. Read at the
# first matmul, so setting them here, before any training, is enough; a user's own values win.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
os.environ.setdefault("LRU_CACHE_CAPACITY", "64")

__version__ = "0.1.0"
