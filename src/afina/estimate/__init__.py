"""Before a run: its tokens and steps, its peak memory, whether it fits, how long it takes, what it costs.

    afina estimate configs/tickets-lora.yaml training.rows_per_batch=2
    estimate = estimate_run(config, train_examples, pad_id)  # everything, time calibrated on this machine
    check_fits(config, train_examples).require_fit()         # the memory check before `afina train` starts

Peak memory is the larger of two moments. Loading: the runtime, the weights, and (on CPU) the
safetensors file mapped while weights are copied out of it into another dtype. Training:

    runtime      CPU: this process's resident memory before the model loads; CUDA: the CUDA context
    weights      every parameter x the bytes of its dtype (bf16 base for frozen-base methods under bf16)
    gradients    every trainable parameter x the bytes of its dtype (kept across micro-batches)
    optimizer    AdamW: two moments per trainable parameter, in its dtype
    activations  what autograd saves for one micro-batch (`afina.estimate.activations`), the logits at
                 trained positions, and one layer's worth of backward temporaries
    allocator    freed memory the allocator keeps: a share of the activations (glibc heaps on CPU,
                 measured; PyTorch's caching allocator on CUDA, rough)
    shape caches bf16 on CPU: what the matmul kernels keep for each distinct micro-batch shape the run meets

Parameter counts come from the model config built on the meta device and prepared by the method's
own `apply_method` (`afina.estimate.activations.prepare_on_meta`), so every method counts exactly
what it will train, without any weights loaded. Time per epoch comes from a few real optimizer steps on this machine, or with `calibrate=False`
from a rough throughput table of known GPUs.
"""

from __future__ import annotations

from afina.config.schema import RunConfig
from afina.data.tokenize import Example
from afina.estimate.fit import Estimate, check_before_launch, check_fits
from afina.estimate.machine import Machine
from afina.estimate.timing import estimate_time

__all__ = ["Estimate", "Machine", "check_before_launch", "check_fits", "estimate_run", "estimate_time"]


def estimate_run(config: RunConfig, examples: list[Example], pad_id: int, calibrate: bool = True,
                 capacity: int | None = None, machine: Machine | None = None) -> Estimate:
    """The whole pre-launch estimate: `check_fits`, then time and cost."""
    estimate = check_fits(config, examples, capacity, machine)
    estimate.time = estimate_time(config, examples, pad_id, estimate, calibrate)
    return estimate
